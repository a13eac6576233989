"""Training utilities for train.py: what each stage trains (paper, "Training Scheme"), saving it,
resumable checkpoints, processes and precision.

  stage 1, multimodal pretraining: fV (ViT) + fK (abstractor, query tokens) train; fL (LLaMA) frozen,
           but the gradient still flows through it back to the visual tokens.
  stage 2, joint instruction tuning: LoRA on fL + fK (the abstractor and its query tokens) train;
           fV and fL's base weights frozen.
           The paper trains the abstractor in stage 2; the released script (peft, LoRA on q_proj and
           v_proj) trained LoRA only: `train_abstractor=False` (train.py --freeze-abstractor) does that.

Frozen weights get requires_grad False, hence no gradient and no optimizer state. Also here: AdamW
parameter groups, the --dropout switch, the adapter files, the resumable training checkpoint (with
every rank's RNG state), torchrun set-up and the precision policy.
"""
import hashlib
import json
import os
import resource
import shutil
from contextlib import nullcontext

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import CheckpointError, atomic_dir, save_model
from .lora import LoRALinear, merge_lora

# Tensors we treat like embeddings: no weight decay (as the 1-D norms and biases).
NO_DECAY = ("query_tokens", "abstractor.vit_eos", "vision_model.embeddings.cls_token",
            "vision_model.embeddings.position_embedding")


def set_trainable(model, stage, train_abstractor=True):
    """requires_grad per stage; returns the names of the trainable parameters."""
    for name, p in model.named_parameters():
        if stage == 1:
            train = not name.startswith("language_model.")
        else:
            fk = name.startswith("abstractor.") or name == "query_tokens"
            train = "lora_" in name or (train_abstractor and fk)
        p.requires_grad_(train)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_by_module(model):
    """{top-level module: (trainable, total)} parameter counts, for the log at start."""
    out = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        t, n = out.get(top, (0, 0))
        out[top] = (t + p.numel() * p.requires_grad, n + p.numel())
    return out


def cast_frozen(model, dtype):
    """Frozen weights to the compute dtype (halves their memory on a GPU); trainable ones stay fp32."""
    for p in model.parameters():
        p.data = p.data.to(dtype if not p.requires_grad else torch.float32)


def param_groups(model, weight_decay, vision_lr_scale=1.0):
    """AdamW groups: decay on matrices (LoRA A/B included), none on norms, biases and the
    embedding-like tensors in NO_DECAY (the usual convention; the paper does not say). The ViT's
    parameters get lr x vision_lr_scale (train.py --vision-lr): a pretrained tower next to a fresh
    abstractor often wants a smaller lr (the paper uses one lr for both)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = not (p.dim() < 2 or name in NO_DECAY)
            scale = vision_lr_scale if name.startswith("vision_model.") else 1.0
            g = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": scale})
            g["params"].append(p)
    return list(groups.values())


def set_dropout(model, p):
    """One number for every dropout: ViT attention, abstractor attention, LoRA (0 = all off)."""
    for m in model.modules():
        if type(m).__name__ in ("VisionAttention", "AbstractorAttention"):
            m.dropout = p
        elif isinstance(m, LoRALinear):
            m.lora_dropout.p = p


# ----------------------------------------------------------------------------- adapter (stage 2)

def sha256_of(path):
    """Checksum of a checkpoint: sha256 over its weight files' bytes, in name order."""
    h = hashlib.sha256()
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors") and not f.startswith("adapter"):
            with open(os.path.join(path, f), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def trainable_state(model):
    """Every trained tensor by its full model name, fp32, on the CPU."""
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, out_dir, lora, base):
    """adapter.safetensors (LoRA A/B + every other trained tensor) + adapter.json, the format
    owl.apply_adapter reads. lora: dict(r, alpha, dropout, targets)."""
    save_file(trainable_state(model), os.path.join(out_dir, "adapter.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(out_dir, "adapter.safetensors.tmp"), os.path.join(out_dir, "adapter.safetensors"))
    meta = dict(lora, base=os.path.abspath(base), base_sha256=sha256_of(base))
    with open(os.path.join(out_dir, "adapter.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(out_dir, "adapter.json.tmp"), os.path.join(out_dir, "adapter.json"))


def move_into(src_dir, out_dir):
    """Move the files of src_dir into out_dir one by one (each os.replace is atomic), then drop src_dir.
    (owl.save_model replaces a whole directory; OUT also holds metrics.jsonl and checkpoint/.)"""
    for f in os.listdir(src_dir):
        os.replace(os.path.join(src_dir, f), os.path.join(out_dir, f))
    shutil.rmtree(src_dir)


def export(model, tok, a, dtype):
    """OUT: the whole model in the official layout (stage 2: LoRA merged) + adapter files (stage 2)."""
    save_dtype = getattr(torch, a.save_dtype) if a.save_dtype else dtype
    if a.stage == 2:
        save_adapter(model, a.out, dict(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                                        targets=a.lora_targets.split(",")), base=a.init)
        merge_lora(model)
    tmp = os.path.join(a.out, ".export")
    save_model(model, tmp, tokenizer_file=tok.model_file, dtype=save_dtype)
    save_preprocessor_config(tmp, model.config.vision_config.image_size)
    move_into(tmp, a.out)


# ----------------------------------------------------------------------------- resumable checkpoint

def save_checkpoint(ckpt_dir, model, optimizer, scaler, step, rng_states, args):
    """OUT/checkpoint/: trainable.safetensors + state.pt (optimizer, step, per-rank RNG, args),
    written to a temporary directory and renamed into place (owl.checkpoint.atomic_dir)."""
    weights = trainable_state(model)
    state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "step": step, "rng": rng_states, "args": args}

    def write(tmp):
        save_file(weights, os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
        torch.save(state, os.path.join(tmp, "state.pt"))
    atomic_dir(ckpt_dir, write)


def load_checkpoint(ckpt_dir, model):
    """Load the trained tensors into model (checked: exactly the trainable names) and return state."""
    wfile, sfile = os.path.join(ckpt_dir, "trainable.safetensors"), os.path.join(ckpt_dir, "state.pt")
    if not (os.path.isfile(wfile) and os.path.isfile(sfile)):
        raise CheckpointError(f"{ckpt_dir}: no training checkpoint to resume from (trainable.safetensors, state.pt)")
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    with safe_open(wfile, framework="pt", device="cpu") as f:
        have = set(f.keys())
        if have != want:
            raise CheckpointError(f"{wfile} does not match this run's trainable tensors: "
                             f"{len(want - have)} missing, {len(have - want)} unexpected "
                             f"(same --stage, --lora-* and --freeze-abstractor as the first run?)")
        with torch.no_grad():
            for n in have:
                params[n].copy_(f.get_tensor(n))
    return torch.load(sfile, map_location="cpu", weights_only=False)


def rng_state():
    import random
    import numpy as np
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    import random
    import numpy as np
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_preprocessor_config(out_dir, image_size):
    """The official processor's preprocessor_config.json (owl.preprocess_image does the same steps)."""
    from .image import CLIP_MEAN, CLIP_STD
    d = {"crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "image_mean": [float(x) for x in CLIP_MEAN], "image_std": [float(x) for x in CLIP_STD],
         "resample": 3, "size": image_size}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(d, f, indent=2)


# ----------------------------------------------------------------------------- processes, precision, logs

def setup(a):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    dev = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if dev.startswith("cuda"):
        if world > 1 or dev == "cuda":  # one GPU per process: the local rank's
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    return rank, world, torch.device(dev)


def precision(a, device):
    """(compute dtype, autocast context, grad scaler): bf16 where the GPU has it, else fp16 with a
    scaler; fp32 on the CPU. Trainable weights and the optimizer state stay fp32 in every case."""
    kind = a.precision
    if kind == "auto":
        kind = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    ctx = nullcontext() if kind == "fp32" else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type) if kind == "fp16" else None
    return dtype, ctx, scaler


def all_sum(x, world, device):
    if world == 1:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def peak_mem_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)


def save_training_state(ckpt_dir, model, opt, scaler, step, a, world, master):
    rng = rng_state()
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    if master:
        save_checkpoint(ckpt_dir, model, opt, scaler, step, rng, vars(a))


def trim_metrics(file, step):
    """On resume, drop the metrics of steps after the checkpoint (they are about to be redone)."""
    if os.path.isfile(file):
        with open(file) as f:
            keep = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
        with open(file, "w") as f:
            f.writelines(keep)
