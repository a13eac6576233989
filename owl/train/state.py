"""What a training run writes: the exported model (OUT, the official layout) and the resumable
checkpoint (OUT/checkpoint/), from which `train.py --resume` continues exactly. The checkpoint holds
no pickle, so reading one that someone shared runs no code:

  trainable.safetensors  the trained tensors, by their model names
  state.safetensors      the optimizer's state tensors ("optimizer.{i}.exp_avg", ...) and each rank's
                         torch and CUDA RNG states ("rng.{rank}.torch", "rng.{rank}.cuda.{j}")
  state.json             the rest: the step (the data position of JSON data is the step alone:
                         batches.StepBatches; of shards, each rank's stream positions: shards.py), the
                         optimizer's param groups, the grad scaler, each rank's Python and numpy RNG
                         states (lists of ints), the run's arguments

A run sharded with FSDP (fsdp.py) gathers its weights and optimizer state into this same layout, so a
checkpoint resumes on any number of processes.

read_state gives back exactly the dict torch.save used to hold. A checkpoint is written into
checkpoint.tmp and renamed into place (owl.fileio.atomic_dir); recover_checkpoint puts the newest
complete one back after a kill at any point of that. An old state.pt (pickle) is refused, never read.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..adapter import save_adapter, trainable_state
from ..fileio import atomic_dir, read_json, read_safetensors, safetensors_shapes
from ..image import CLIP_MEAN, CLIP_STD
from ..lora import merge_lora
from ..weights import WeightsError, check_keys, save_model
from .fsdp import full_optimizer_state, full_state, load_full_state, local
from .parallel import all_sum


class CheckpointError(ValueError):
    """A training checkpoint (OUT/checkpoint) that cannot be saved or resumed: train.py prints one line."""


FORMAT = "owl-training-state/1"


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
    tmp = os.path.join(out, ".export")
    try:
        if lora is not None:
            save_adapter(model, out, lora, base)
            merge_lora(model)
        save_model(model, tmp, tokenizer_file=tokenizer_file, dtype=save_dtype)
    except SafetensorError as e:  # e.g. the disk filled (redteam-2 3.14); save_model's atomic_dir left nothing
        raise OSError(f"{out}: the model could not be written ({e}); the checkpoint is intact: --resume "
                      f"exports it again") from None
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


def state_to_files(state):
    """The training state {optimizer, scaler, step, rng: [per rank], args} -> (tensors, a JSON-able dict)."""
    tensors, opt_values = {}, {}
    for i, st in state["optimizer"]["state"].items():  # a tensor's place in state.json: {"tensor": its name}
        opt_values[str(i)] = {k: {"tensor": f"optimizer.{i}.{k}"} if torch.is_tensor(v) else v for k, v in st.items()}
        tensors.update({f"optimizer.{i}.{k}": v.detach().cpu().contiguous() for k, v in st.items() if torch.is_tensor(v)})
    rngs = []
    for r, s in enumerate(state["rng"]):
        tensors[f"rng.{r}.torch"] = s["torch"]
        tensors.update({f"rng.{r}.cuda.{j}": t for j, t in enumerate(s["cuda"] or [])})
        name, keys, pos, has_gauss, gauss = s["numpy"]
        rngs.append({"python": [s["python"][0], list(s["python"][1]), s["python"][2]],
                     "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
                     "cuda": None if s["cuda"] is None else len(s["cuda"])})
    meta = {"format": FORMAT, "step": state["step"], "args": state["args"], "scaler": state["scaler"],
            "optimizer": {"param_groups": state["optimizer"]["param_groups"], "state": opt_values}, "rng": rngs}
    if state.get("data") is not None:  # shards: each rank's stream positions (JSON already)
        meta["data"] = state["data"]
    seen = set()  # safetensors refuses tensors that share memory: copy those
    for k, t in tensors.items():
        tensors[k] = t.clone() if t.untyped_storage().data_ptr() in seen else t
        seen.add(t.untyped_storage().data_ptr())
    return tensors, meta


def files_to_state(tensors, meta, optimizer=True):
    """The inverse of state_to_files: the same dicts, tuples and tensors (dtypes included).
    optimizer=False: the optimizer's tensors were not read (its state comes back None)."""
    opt = {int(i): {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in st.items()}
           for i, st in meta["optimizer"]["state"].items()} if optimizer else None
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["optimizer"]["param_groups"]]  # JSON has no tuples: betas come back as one
    rng = []
    for r, s in enumerate(meta["rng"]):
        version, ints, gauss = s["python"]
        name, keys, pos, has_gauss, cached = s["numpy"]
        rng.append({"python": (version, tuple(ints), gauss),
                    "numpy": (name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
                    "torch": tensors[f"rng.{r}.torch"],
                    "cuda": None if s["cuda"] is None else [tensors[f"rng.{r}.cuda.{j}"] for j in range(s["cuda"])]})
    out = {"optimizer": None if opt is None else {"state": opt, "param_groups": groups}, "scaler": meta["scaler"],
           "step": meta["step"], "rng": rng, "args": meta["args"]}
    return {**out, "data": meta["data"]} if "data" in meta else out


def write_state(folder, state):
    tensors, meta = state_to_files(state)
    save_file(tensors, os.path.join(folder, "state.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(meta, f)


def read_meta(folder):
    """state.json of a checkpoint folder (the step, the arguments, ...), checked to be this format."""
    file = os.path.join(folder, "state.json")
    if os.path.isfile(os.path.join(folder, "state.pt")) and not os.path.isfile(file):
        raise CheckpointError(f"{folder}/state.pt: a training state in the old pickle format is never read "
                              f"(unpickling can run code), so this checkpoint cannot be resumed: start the run again")
    if not os.path.isfile(file) or not os.path.isfile(os.path.join(folder, "trainable.safetensors")):
        raise CheckpointError(f"{folder}: no training checkpoint to resume from (trainable.safetensors, "
                              f"state.safetensors, state.json)")
    meta = read_json(file, CheckpointError, "a training state")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a training state of this format ({FORMAT})")
    step = meta.get("step")  # a hand-edited negative step trained with a negative learning rate (redteam-2 4.6)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{file}: the training state is invalid (step {step!r}: not an integer >= 0)")
    if bad := invalid_field(meta):
        raise CheckpointError(f"{file}: the training state is invalid ({bad})")
    return meta


def invalid_field(meta):
    """The first field of state.json that resume could not use, or None: a hand-edited file stops here,
    named, not in a traceback at the first step (redteam-2 4.8)."""
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    ints = lambda v, n: isinstance(v, list) and len(v) == n and all(isinstance(i, int) for i in v)  # noqa: E731
    args, rngs, opt = meta.get("args"), meta.get("rng"), meta.get("optimizer")
    for k in ("batch_size", "grad_accum"):
        if not isinstance(args, dict) or not count(args.get(k)):
            return f"args.{k}"
    for r, st in enumerate(rngs if isinstance(rngs, list) and rngs else [None]):
        py, nps = (st.get("python"), st.get("numpy")) if isinstance(st, dict) else (None, None)
        if not (isinstance(py, list) and len(py) == 3 and ints(py[1], 625)):  # random.getstate()
            return f"rng.{r}.python"
        if not (isinstance(nps, list) and len(nps) == 5 and ints(nps[1], 624)):  # numpy's MT19937
            return f"rng.{r}.numpy"
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    for i, g in enumerate(groups if isinstance(groups, list) and groups else [None]):
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not isinstance(g, dict) or not (isinstance(g.get("betas"), list) and len(g["betas"]) == 2
                                           and all(map(number, g["betas"]))):
            return f"optimizer.param_groups.{i}.betas"
        if bad := [k for k in ("lr", "eps", "weight_decay", "lr_scale") if k in g and not number(g[k])]:
            return f"optimizer.param_groups.{i}.{bad[0]}"
    return None


def read_state(folder, optimizer=True):
    """The training state of a checkpoint folder, as save_checkpoint was given it (optimizer=False:
    without the optimizer's tensors, which FSDP's other ranks get from rank 0)."""
    meta = read_meta(folder)
    tensors = dict(read_safetensors(os.path.join(folder, "state.safetensors"),
                                    None if optimizer else (lambda k: not k.startswith("optimizer.")), CheckpointError))
    try:
        return files_to_state(tensors, meta, optimizer)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{folder}/state.json: the training state is incomplete ({type(e).__name__}: {e})") from None


def save_checkpoint(ckpt_dir, weights, optimizer_state, scaler, step, rng_states, args, data=None):
    """OUT/checkpoint/ (the files in the module docstring), written to a temporary directory and renamed
    into place (owl.fileio.atomic_dir). weights: the trained tensors; optimizer_state: its state_dict()."""
    state = {"optimizer": optimizer_state, "scaler": scaler.state_dict() if scaler else None,
             "step": step, "rng": rng_states, "args": args, "data": data}

    def write(tmp):
        save_file(weights, os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
        write_state(tmp, state)
    atomic_dir(ckpt_dir, write)


def save_training_state(ckpt_dir, model, optimizer, scaler, step, args, world, master, data=None,
                        sharded=False):
    """Every rank calls this (the RNG states and the data positions are gathered, with sharded also the
    weights and the optimizer state: fsdp.py); the master writes. args: a dict; data: the shard dataset
    or None. Non-finite weights (a diverged update) are never saved: the run stops, naming the last save."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bad = not all_finite([local(p) for _, p in trained])  # sharded: this process's slices, then all of them
    if (all_sum(bad, world, model.query_tokens.device) > 0) if sharded else bad:
        raise CheckpointError(f"step {step}: the update made the weights non-finite; stopped before saving them "
                              f"({last_saved(ckpt_dir)})")
    gathered = [rng_state(), None if data is None else data.state_dict()]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, gathered)  # between the processes, not into a file
        gathered = everyone
    else:
        gathered = [gathered]
    if sharded:
        weights, opt_state = full_state(model, {n for n, _ in trained}), full_optimizer_state(model, optimizer)
    elif master:
        weights, opt_state = trainable_state(model), optimizer.state_dict()
    if master:
        save_checkpoint(ckpt_dir, weights, opt_state, scaler, step, [g[0] for g in gathered], args,
                        data=None if data is None else [g[1] for g in gathered])


def complete(folder):
    """Whether a checkpoint folder holds all its files, whole (safetensors checks that a file covers its header)."""
    try:
        read_meta(folder)
        for f in ("trainable.safetensors", "state.safetensors"):
            safetensors_shapes(os.path.join(folder, f))
        return True
    except Exception:
        return False


def recover_checkpoint(ckpt_dir, log=print):
    """After a kill during a save (atomic_dir: write checkpoint.tmp, rename checkpoint -> .old, rename
    .tmp -> checkpoint, remove .old), put the newest complete checkpoint in place. With checkpoint/
    there, .tmp and .old are an unfinished save and the one before: removed. Without it, the kill
    came between the renames: .tmp is complete and newest; else .old is the one."""
    tmp, old = ckpt_dir + ".tmp", ckpt_dir + ".old"
    if not os.path.isdir(ckpt_dir):
        for found in (tmp, old):
            if os.path.isdir(found) and complete(found):
                os.replace(found, ckpt_dir)
                log(f"note: {ckpt_dir} recovered from {os.path.basename(found)} (a save was interrupted)")
                break
    if os.path.isdir(ckpt_dir):
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------- --resume

def load_checkpoint(ckpt_dir, model, sharded_optimizer=None, rank=0):
    """Load the trained tensors into model (every rank checks the names and shapes in the file's header)
    and return the state. sharded_optimizer (fsdp.py): rank 0 reads weights and optimizer, sends the slices."""
    sharded = sharded_optimizer is not None
    state = read_state(ckpt_dir, optimizer=not sharded or rank == 0)
    wfile = os.path.join(ckpt_dir, "trainable.safetensors")
    params = dict(model.named_parameters())
    shapes = safetensors_shapes(wfile, CheckpointError)
    try:
        check_keys({n: p.shape for n, p in params.items() if p.requires_grad}, shapes, wfile)
    except WeightsError as e:
        raise CheckpointError(f"{e}\n  hint: resume with the first run's --stage, --lora-*, --freeze-abstractor, "
                              f"--full-finetune and abstractor flags") from None
    weights = dict(read_safetensors(wfile, error=CheckpointError)) if not sharded or rank == 0 else {}
    bad = [n for n, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # (redteam-2 4.10: a NaN tensor resumed, and the run's stop called it "the last good checkpoint")
        raise CheckpointError(f"{wfile}: {bad[0]} holds non-finite values: this checkpoint cannot be resumed")
    if sharded:
        load_full_state(model, sharded_optimizer, weights, state["optimizer"] or {})
        return state
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    return state


def resume(ckpt_dir, model, optimizer, scaler, *, rank, world, batch_size, grad_accum, data=None, sharded=False,
           log=print):
    """Load OUT/checkpoint into the model and the optimizer, this rank's RNG state and (data: the shard
    dataset) its data position; returns the step to continue from (train.py --resume)."""
    state = load_checkpoint(ckpt_dir, model, optimizer if sharded else None, rank)
    if not sharded:
        load_optimizer(ckpt_dir, optimizer, state["optimizer"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    was = (len(state["rng"]), state["args"]["batch_size"], state["args"]["grad_accum"])
    if was == (world, batch_size, grad_accum):
        set_rng_state(state["rng"][rank])
    else:  # it continues, but not exactly as the first run would have
        log(f"warning: (processes, batch, accumulation) were {was}, now {(world, batch_size, grad_accum)}: "
            f"the data order and RNG streams differ from an uninterrupted run")
    saved = state.get("data") or []
    if data is not None and (rank >= len(saved) or not data.load_state_dict(saved[rank])):
        log("warning: the shard streams' positions were saved for other processes, workers, seed, shards or "
            "--shuffle-buffer: the shards are read from the start")
    log(f"resumed from {ckpt_dir} at step {state['step']}")
    return state["step"]


def load_optimizer(ckpt_dir, optimizer, saved):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in saved["state"].items():
        if i >= len(params) or any(v.dim() and v.shape != params[i].shape for v in st.values() if torch.is_tensor(v)):
            raise CheckpointError(f"{ckpt_dir}/state.safetensors: the optimizer state does not fit this run's "
                                  f"trainable tensors (parameter {i})")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt_dir}/state.json: the optimizer state does not fit this run ({e})") from None


def last_saved(ckpt_dir):
    """Where the last saved checkpoint is, for the message of a run that stops."""
    try:
        return f"the last good checkpoint is {ckpt_dir}, step {read_meta(ckpt_dir)['step']}"
    except CheckpointError:
        return "no checkpoint was saved"


def all_finite(tensors):
    """Whether every tensor is finite (one host sync): checked before anything is saved."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True
