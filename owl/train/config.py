"""Every option of a training run, in one dataclass (nanoVLM's TrainConfig; nanoGPT's one block of
defaults, without its exec). Each field is written once: its default, its help line and what
`--resume` does when it differs from the first run's:

  "exact"  another value would not continue that run (another model shape, other data, another
           held-out split): --resume refuses, naming the flag;
  "warn"   the run goes on, not as the first run would have: a warning;
  "free"   nothing (where OUT is, how often to save, the device; batch and accumulation are
           warned about by the RNG check in state.resume).

train.py's argparse is built from the fields (parse), the resume check reads them (check_resumed),
and the demo builds a TrainConfig and turns it back into the command line it runs (to_argv).
"""
import argparse
import os
from dataclasses import dataclass, field, fields, replace


class TrainError(ValueError):
    """A run that cannot start or go on: train.py prints it as one line."""


def opt(default, help, resume="free", *, flags=(), choices=None, norm=None):
    """A field of TrainConfig. flags: other names of the option; norm: how two values compare on
    --resume ("path": the same file, "paths": the same list of files, "bool": only whether it is set)."""
    return field(default=default, metadata=dict(help=help, resume=resume, flags=flags, choices=choices, norm=norm))


@dataclass
class TrainConfig:
    # what trains, from what, on what (owl/train/stages.py, data.py, shards.py)
    stage: int = opt(None, "1: multimodal pretraining (ViT + abstractor, LLM frozen), 2: joint instruction "
                     "tuning (LoRA + abstractor, ViT frozen)", "exact", choices=(1, 2))
    vision_init: str = opt(None, "stage 1: an HF CLIP model folder (the ViT)", "exact", norm="path")
    llm_init: str = opt(None, "stage 1: an HF LLaMA model folder (LLaMA + tokenizer.model)", "exact", norm="path")
    init: str = opt(None, "stage 2: an mPLUG-Owl model folder (a stage-1 output or a released -pt model)", "exact",
                    norm="path")
    data: str = opt(None, "data files, comma-separated (owl/train/data.py), or .tar shards (owl/train/shards.py)",
                    "exact", norm="paths")
    out: str = opt(None, "output folder: the final model, checkpoint/ (to resume), metrics.jsonl", norm="path")
    image_root: str = opt(None, "resolve relative image paths here (default: beside the data file)", "exact",
                          norm="path")
    check_data: bool = opt(False, "read and check --data, open every image, print the counts, and exit")
    # the optimizer and its schedule (nanoGPT's cosine with warm-up: train.get_lr)
    max_steps: int = opt(1000, "optimizer steps", "warn")
    batch_size: int = opt(4, "examples per process and micro-step")
    grad_accum: int = opt(1, "micro-steps per optimizer step")
    lr: float = opt(None, "peak learning rate (default: 1e-4 in stage 1, 2e-5 in stage 2, the paper's)", "warn")
    min_lr: float = opt(None, "the cosine's floor (default: lr / 10; the paper gives none)", "warn")
    vision_lr: float = opt(None, "stage 1: the ViT's peak learning rate (default: lr)", "warn")
    warmup_steps: int = opt(None, "linear warm-up steps (default: 4%% of max-steps; the paper: 2k of 50k)", "warn")
    weight_decay: float = opt(0.1, "AdamW's weight decay (not on norms, biases, embeddings)", "warn")
    grad_clip: float = opt(1.0, "max gradient norm; 0 = no clipping", "warn")
    dropout: float = opt(None, "set every dropout (ViT, abstractor, LoRA); 0 = all off (default: as configured)",
                         "warn")
    seed: int = opt(42, "data order, held-out split, LoRA and abstractor init, dropout", "exact")
    max_length: int = opt(None, "tokens per example, image slots included (default: the LLM's context)", "exact")
    max_bad_fraction: float = opt(0.05, "stop when a larger share of the examples have unreadable images")
    shuffle_buffer: int = opt(1000, "shards: samples shuffled together", "warn")
    # the machine
    device: str = opt("auto", "cpu, cuda or cuda:N (default: cuda when there is one)")
    precision: str = opt("auto", "compute precision (auto: bf16 on GPUs that have it, fp16 on others, fp32 on "
                         "CPUs); trained weights and Adam's state stay fp32", "warn",
                         choices=("auto", "fp32", "bf16", "fp16"))
    grad_checkpointing: str = opt("auto", "recompute each block's activations in backward: less memory, ~1/3 more "
                                  "compute (auto: on a GPU only when owl.memory's estimate without it does not "
                                  "fit the free memory; off on a CPU)", choices=("auto", "on", "off"))
    compile: bool = opt(False, "compile each ViT, abstractor and LLaMA block (regional torch.compile): faster "
                        "steps on a GPU after a first one that waits for the compiler")
    workers: int = opt(None, "DataLoader workers (default: 0 on a CPU, 4 on CUDA)")
    # saving, held-out loss, resuming
    save_every: int = opt(500, "save a checkpoint every N steps; 0 = at the end only")
    eval_every: int = opt(200, "the held-out loss every N steps; 0 = none (and nothing held out)", "exact",
                          norm="bool")
    eval_examples: int = opt(None, "held-out examples (default: 2%%, at most 200)", "exact")
    resume: bool = opt(False, "continue from OUT/checkpoint exactly (the same options)")
    stop_at: int = opt(None, "save a checkpoint at this step and exit, e.g. before a job's time limit")
    save_dtype: str = opt(None, "dtype of the exported model (default: the compute dtype)",
                          choices=("float32", "bfloat16", "float16"))
    # stage 2 (the released script: LoRA r 8, alpha 32, dropout 0.05 on q_proj and v_proj)
    lora_r: int = opt(8, "LoRA rank", "exact")
    lora_alpha: float = opt(32, "LoRA alpha: the update is scaled by alpha / r", "exact")
    lora_dropout: float = opt(0.05, "dropout on LoRA's input", "warn")
    lora_targets: str = opt("q_proj,v_proj", "the LLM's linear layers that get LoRA, comma-separated", "exact")
    freeze_abstractor: bool = opt(False, "stage 2: LoRA only, the abstractor frozen (the released script)", "exact")
    full_finetune: bool = opt(False, "stage 2: the whole LLM + the abstractor, no LoRA (FSDP2 under torchrun)",
                              "exact")
    freeze_vision: bool = opt(False, "stage 1: the abstractor only, the ViT frozen (LLaVA, MiniGPT-4)", "exact")
    # the abstractor stage 1 creates (the released model's: 64 queries, 6 layers, 16 heads, SwiGLU 2816)
    num_queries: int = opt(64, "learned queries (an image is num-queries + 1 LLM tokens)", "exact",
                           flags=("--num-query-tokens",))
    abstractor_layers: int = opt(6, "abstractor layers", "exact")
    abstractor_hidden: int = opt(None, "abstractor width (default, and the only choice: the ViT's)", "exact")
    abstractor_heads: int = opt(16, "abstractor attention heads", "exact")
    abstractor_mlp: int = opt(2816, "abstractor SwiGLU width", "exact", flags=("--abstractor-intermediate",))


def flag(f):
    return "--" + f.name.replace("_", "-")


def parser(cls=TrainConfig):
    """train.py's argparse, one option per field of cls (help with its default)."""
    p = argparse.ArgumentParser(description="Train mPLUG-Owl, both stages, in one plain loop.",
                                epilog="Where an option is left out, its default is used; --resume checks the options "
                                       "that would change the run (owl/train/config.py).")
    for f in fields(cls):
        m = f.metadata
        text = m["help"] + ("" if f.default in (None, False) or "default:" in m["help"] else f" (default: {f.default})")
        if f.type is bool:
            p.add_argument(flag(f), *m["flags"], dest=f.name, action="store_true", default=f.default, help=text)
        else:
            metavar = {"path": "DIR", "paths": "FILES"}.get(m["norm"]) or {int: "N", float: "X"}.get(f.type, "NAME")
            p.add_argument(flag(f), *m["flags"], dest=f.name, type=f.type, choices=m["choices"], default=f.default,
                           help=text, metavar=None if m["choices"] else metavar)
    return p


def parse(argv=None, cls=TrainConfig):
    """argv -> a checked TrainConfig with the derived defaults filled in (resolved)."""
    cfg = cls(**vars(parser(cls).parse_args(argv)))
    check(cfg)
    return resolved(cfg)


def check(cfg):
    """Every rule between values, one line naming all that fail (before anything is read)."""
    sizes = (cfg.num_queries, cfg.abstractor_layers, cfg.abstractor_heads, cfg.abstractor_mlp, cfg.lora_r)
    need = {"--batch-size >= 1": cfg.batch_size >= 1, "--grad-accum >= 1": cfg.grad_accum >= 1,
            "--max-steps, --save-every, --eval-every >= 0": min(cfg.max_steps, cfg.save_every, cfg.eval_every) >= 0,
            "0 <= --seed < 2**63": 0 <= cfg.seed < 2**63, "--num-queries, --abstractor-*, --lora-r >= 1": min(sizes) > 0,
            "--shuffle-buffer >= 1": cfg.shuffle_buffer >= 1,
            "--full-finetune with --stage 2 (not 1)": not (cfg.full_finetune and cfg.stage == 1),
            "--freeze-vision with --stage 1 (not 2)": not (cfg.freeze_vision and cfg.stage == 2)}
    if not all(need.values()):
        raise TrainError(f"need {'; '.join(k for k, ok in need.items() if not ok)} (train.py --help lists the options)")


def resolved(cfg):
    """The defaults that depend on other options, filled in (what the run uses and state.json keeps)."""
    lr = cfg.lr if cfg.lr is not None else (1e-4 if cfg.stage == 1 else 2e-5)
    return replace(cfg, lr=lr, min_lr=cfg.min_lr if cfg.min_lr is not None else lr / 10,
                   warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else round(0.04 * cfg.max_steps))


def to_argv(cfg):
    """The train.py command line that gives cfg (the options that differ from their defaults)."""
    argv = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v != f.default:
            argv += [flag(f)] if f.type is bool else [flag(f), str(v)]
    return argv


def _norm(f, v):
    how = f.metadata["norm"]
    if v is None:
        return None
    if how == "paths":
        return [os.path.abspath(p) for p in v.split(",")]
    return os.path.abspath(v) if how == "path" else bool(v) if how == "bool" else v


def check_resumed(was, now, source, log=print):
    """Compare this run's options (now, a TrainConfig) with the first run's (was: the dict state.json
    keeps): an error naming the "exact" ones that differ, a warning naming the "warn" ones. An option
    the first run did not know had its default then."""
    def changed(kind):
        return [f"{flag(f)} {getattr(now, f.name)} (was {was.get(f.name, f.default)})" for f in fields(now)
                if f.metadata["resume"] == kind and _norm(f, was.get(f.name, f.default)) != _norm(f, getattr(now, f.name))]
    wrong = changed("exact")
    if wrong:
        raise TrainError(f"--resume: {', '.join(wrong)}: not the run saved in {source}; pass its values, "
                         f"or start a new run with another --out")
    if changed("warn"):
        log(f"warning: --resume with {', '.join(changed('warn'))}: the run goes on, not as the first run would have")
