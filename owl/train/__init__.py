"""train.py's library: the data formats (data.py), what each stage trains (stages.py) and the
training state: export, the resumable checkpoint, RNG (state.py)."""
