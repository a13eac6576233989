"""train.py's library: the options (config.py: TrainConfig), the data formats (data.py) and webdataset
shards (shards.py), batches (batches.py), what each stage trains (stages.py), processes and precision
(parallel.py), FSDP2 for full fine-tuning (fsdp.py), the exported model and the resumable checkpoint
(state.py), and what keeps a run's output whole: the lock, signals, metrics (safety.py)."""
