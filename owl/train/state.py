"""What a training run writes: the exported model (OUT, the official layout) and the resumable
checkpoint (OUT/checkpoint/: the trained tensors, the optimizer, the step, every rank's RNG state, the
arguments), from which `train.py --resume` continues exactly.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..image import CLIP_MEAN, CLIP_STD
from ..lora import merge_lora, save_adapter, trainable_state
from ..weights import CheckpointError, atomic_dir, check_keys, save_model


# ----------------------------------------------------------------------------- the exported model

def move_into(src_dir, out_dir):
    """Move the files of src_dir into out_dir one by one (each os.replace is atomic), then drop src_dir.
    (owl.save_model replaces a whole directory; OUT also holds metrics.jsonl and checkpoint/.)"""
    for f in os.listdir(src_dir):
        os.replace(os.path.join(src_dir, f), os.path.join(out_dir, f))
    shutil.rmtree(src_dir)


def save_preprocessor_config(out_dir, image_size):
    """The official processor's preprocessor_config.json (owl.preprocess_image does the same steps)."""
    d = {"crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "image_mean": [float(x) for x in CLIP_MEAN], "image_std": [float(x) for x in CLIP_STD],
         "resample": 3, "size": image_size}
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(d, f, indent=2)


def export(model, out, tokenizer_file, save_dtype, lora=None, base=None):
    """OUT: the whole model in the official layout. In stage 2 (lora: dict(r, alpha, dropout,
    targets); base: the --init folder) the adapter files are written first, then LoRA is merged."""
    if lora is not None:
        save_adapter(model, out, lora, base)
        merge_lora(model)
    tmp = os.path.join(out, ".export")
    save_model(model, tmp, tokenizer_file=tokenizer_file, dtype=save_dtype)
    save_preprocessor_config(tmp, model.config.vision_config.image_size)
    move_into(tmp, out)


# ----------------------------------------------------------------------------- the resumable checkpoint

def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(ckpt_dir, model, optimizer, scaler, step, rng_states, args):
    """OUT/checkpoint/: trainable.safetensors + state.pt (optimizer, step, per-rank RNG, args),
    written to a temporary directory and renamed into place (owl.weights.atomic_dir)."""
    weights = trainable_state(model)
    state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "step": step, "rng": rng_states, "args": args}

    def write(tmp):
        save_file(weights, os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
        torch.save(state, os.path.join(tmp, "state.pt"))
    atomic_dir(ckpt_dir, write)


def save_training_state(ckpt_dir, model, optimizer, scaler, step, args, world, master):
    """Every rank calls this (the RNG states are gathered); the master writes. args: a dict."""
    rng = rng_state()
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    if master:
        save_checkpoint(ckpt_dir, model, optimizer, scaler, step, rng, args)


def load_checkpoint(ckpt_dir, model):
    """Load the trained tensors into model (checked: exactly the trainable names) and return state."""
    wfile, sfile = os.path.join(ckpt_dir, "trainable.safetensors"), os.path.join(ckpt_dir, "state.pt")
    if not (os.path.isfile(wfile) and os.path.isfile(sfile)):
        raise CheckpointError(f"{ckpt_dir}: no training checkpoint to resume from (trainable.safetensors, state.pt)")
    params = dict(model.named_parameters())
    with safe_open(wfile, framework="pt", device="cpu") as f:
        try:
            check_keys({n: p.shape for n, p in params.items() if p.requires_grad},
                       {k: f.get_slice(k).get_shape() for k in f.keys()}, wfile)
        except CheckpointError as e:
            raise CheckpointError(f"{e}\n  hint: resume with the first run's --stage, --lora-*, --freeze-abstractor "
                                  f"and abstractor flags") from None
        with torch.no_grad():
            for n in f.keys():
                params[n].copy_(f.get_tensor(n))
    return torch.load(sfile, map_location="cpu", weights_only=False)


def resume(ckpt_dir, model, optimizer, scaler, *, rank, world, batch_size, grad_accum, log=print):
    """Load OUT/checkpoint into the model and the optimizer and this rank's RNG state; returns the
    step to continue from (train.py --resume)."""
    state = load_checkpoint(ckpt_dir, model)
    optimizer.load_state_dict(state["optimizer"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    was = (len(state["rng"]), state["args"]["batch_size"], state["args"]["grad_accum"])
    if was == (world, batch_size, grad_accum):
        set_rng_state(state["rng"][rank])
    else:  # it continues, but not exactly as the first run would have
        log(f"warning: (processes, batch, accumulation) were {was}, now {(world, batch_size, grad_accum)}: "
            f"the data order and RNG streams differ from an uninterrupted run")
    log(f"resumed from {ckpt_dir} at step {state['step']}")
    return state["step"]


def trim_metrics(file, step):
    """On resume, drop the metrics of steps after the checkpoint (they are about to be redone)."""
    if os.path.isfile(file):
        with open(file) as f:
            keep = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
        with open(file, "w") as f:
            f.writelines(keep)
