"""Stage 2's adapter files (paper, "Joint Instruction Tuning": LoRA on fL, the abstractor trained too),
apart from the LoRA layer itself as loralib keeps its utils apart from its layers:

  adapter.safetensors  LoRA A/B and every other tensor stage 2 trained (e.g. the abstractor), by name
  adapter.json         r, alpha, dropout, targets, the base model folder and its weight files' sha256

An adapter trained on another base (the sha256 differs) is refused unless asked otherwise (chat.py
--ignore-adapter-base). `python -m owl.convert merge` folds an adapter into a model folder.
"""
import hashlib
import json
import math
import os

import torch
from safetensors.torch import save_file

from .fileio import read_json, read_safetensors, write_atomic
from .lora import apply_lora
from .weights import WeightsError, check_keys


def trainable_state(model):
    """Every trained tensor by its full model name, fp32, on the CPU (the adapter; train.py's checkpoint)."""
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def sha256_of(path):
    """Checksum of a model folder: sha256 over its weight files' bytes, in name order."""
    h = hashlib.sha256()
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors") and not f.startswith("adapter"):
            if not os.path.isfile(os.path.join(path, f)):  # a link to /dev/zero would be read forever (1.11)
                raise WeightsError(f"{os.path.join(path, f)} is not a regular file")
            with open(os.path.join(path, f), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def save_adapter(model, out_dir, lora, base):
    """adapter.safetensors + adapter.json (the module docstring), the format apply_adapter reads.
    lora: dict(r, alpha, dropout, targets); base: the model folder trained on."""
    save_file(trainable_state(model), os.path.join(out_dir, "adapter.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(out_dir, "adapter.safetensors.tmp"), os.path.join(out_dir, "adapter.safetensors"))
    write_atomic(os.path.join(out_dir, "adapter.json"),
                 json.dumps(dict(lora, base=os.path.abspath(base), base_sha256=sha256_of(base)), indent=2))


def read_adapter_meta(adapter_file):
    """adapter.json beside adapter_file, checked: r, alpha, targets (and dropout) of the right types."""
    meta_file = os.path.join(os.path.dirname(os.path.abspath(adapter_file)), "adapter.json")
    if not os.path.isfile(adapter_file):
        raise WeightsError(f"{adapter_file}: no such adapter file")
    if not os.path.isfile(meta_file):
        raise WeightsError(f"{meta_file}: missing (it holds the adapter's r, alpha and targets)")
    meta = read_json(meta_file, WeightsError)
    # finite numbers only: json reads NaN and Infinity, and alpha NaN gives empty answers (redteam-2 1.14)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    ok = {"r": isinstance(meta.get("r"), int) and meta["r"] > 0, "alpha": number(meta.get("alpha")),
          "dropout": number(meta.get("dropout", 0.0)),
          "targets": isinstance(meta.get("targets"), list) and all(isinstance(t, str) for t in meta["targets"])}
    bad = [k for k, good in ok.items() if not good]
    if bad:
        raise WeightsError(f"{meta_file}: missing or invalid {', '.join(bad)} (r: a positive integer, "
                           f"alpha and dropout: numbers, targets: a list of layer names)")
    return meta


def check_adapter_base(adapter_file, base_dir):
    """Refuse an adapter trained on another base: adapter.json's base_sha256 (train.py writes it) must
    be the base folder's (one read of its weight files). An adapter.json without one is not checked."""
    meta = read_adapter_meta(adapter_file)
    want = meta.get("base_sha256")
    if want is not None and want != sha256_of(base_dir):
        raise WeightsError(f"{adapter_file} was trained on another base model ({meta.get('base', '?')}, "
                           f"sha256 {str(want)[:12]}...), not {base_dir}: pass --ignore-adapter-base to apply it anyway")
    return meta


def apply_adapter(model, adapter_file):
    """Put the LoRA layers described by adapter.json (beside adapter_file) on the LLM and load the
    adapter's tensors (LoRA A/B and any other trained tensor, e.g. the abstractor), checked."""
    meta = read_adapter_meta(adapter_file)
    sd = dict(read_safetensors(adapter_file, error=WeightsError))
    # r against the tensors' rank before apply_lora allocates r x width per layer (r 1e8: 38 GB, redteam-2 1.13)
    ranks = {k: v.shape[0] if k.endswith("lora_A") else v.shape[-1] for k, v in sd.items() if k.endswith(("lora_A", "lora_B"))}
    wrong = [k for k, r in ranks.items() if r != meta["r"]]
    if wrong:
        raise WeightsError(f"{os.path.dirname(os.path.abspath(adapter_file))}/adapter.json: r {meta['r']:,} but "
                           f"{wrong[0]} has rank {ranks[wrong[0]]}")
    try:
        apply_lora(model.language_model, tuple(meta["targets"]), meta["r"], meta["alpha"], meta.get("dropout", 0.0))
    except ValueError as e:  # no layer of that name
        raise WeightsError(f"{adapter_file}: {e}") from None
    have = model.state_dict()
    want = {k: v.shape for k, v in have.items() if "lora_" in k or k in sd}  # every LoRA tensor, and what it trained
    check_keys(want, {k: v.shape for k, v in sd.items()}, adapter_file)
    with torch.no_grad():
        for k, v in sd.items():
            have[k].copy_(v)  # state_dict tensors share storage with the parameters; copy_ casts dtype
    return meta
