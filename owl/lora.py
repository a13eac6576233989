"""LoRA (paper, "Joint Instruction Tuning": "we freeze the entire model and employ low-rank adaption
... to adapt fL"), as a drop-in wrapper of nn.Linear in the manner of microsoft/loralib:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A: (r, in), B: (out, r)

B starts at zero, so step 0 equals the base model. The base weight keeps its name (`q_proj.weight`)
so a model with LoRA still loads base checkpoints; `merge()` folds BA into W for inference.
The official release applied it with peft to q_proj and v_proj, r=8, alpha=32, dropout 0.05.

The adapter files are written and read here too: adapter.safetensors (LoRA A/B and every other
tensor stage 2 trained, e.g. the abstractor) + adapter.json (r, alpha, dropout, targets, the base).

    python -m owl.lora merge BASE_DIR ADAPTER_FILE OUT_DIR [--ignore-adapter-base]   # fold it into a model

adapter.json's base_sha256 is checked against the base folder: an adapter trained on another base is
refused (--ignore-adapter-base applies it anyway).
"""
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .weights import CheckpointError, check_destination, check_keys, load_model, read_json, save_model


class LoRALinear(nn.Linear):
    def __init__(self, in_features, out_features, r=8, alpha=32, dropout=0.05, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.weight.requires_grad_(False)
        self.reset_lora(device)

    def reset_lora(self, device=None):
        """Fresh A (kaiming, as loralib and peft) and B = 0. A and B are fp32 (they are what trains)
        whatever the base weight's dtype."""
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device))
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r, alpha, dropout):
        """Wrap an existing layer, sharing (not copying) its weight and bias."""
        m = cls(linear.in_features, linear.out_features, r, alpha, dropout, bias=linear.bias is not None,
                device="meta")  # a placeholder base weight, replaced by the layer's own
        m.weight, m.bias = linear.weight, linear.bias
        m.weight.requires_grad_(False)
        m.reset_lora(linear.weight.device)
        return m

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        a = self.lora_dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return super().extra_repr() + f", r={self.r}, alpha={self.alpha}"


def replace_children(module: nn.Module, new):
    """Swap every child `c` (named `name`) of every submodule for `new(name, c)` where that is not
    None; returns the full names swapped. One walk for apply_lora, merge_lora and quant.quantize_int8."""
    done = []
    for prefix, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            swap = new(name, child)
            if swap is not None:
                setattr(parent, name, swap)
                done.append(f"{prefix}.{name}" if prefix else name)
    return done


def apply_lora(module: nn.Module, targets=("q_proj", "v_proj"), r=8, alpha=32, dropout=0.05):
    """Replace every nn.Linear whose name ends in one of `targets` by a LoRALinear; returns the names."""
    done = replace_children(module, lambda name, c: LoRALinear.from_linear(c, r, alpha, dropout)
                            if name in targets and type(c) is nn.Linear else None)
    if not done:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} to put LoRA on")
    return done


def merge_lora(module, unwrap=True):
    """Fold every adapter into its base weight; with unwrap, put plain nn.Linear layers back."""
    def merged(name, c):
        if not isinstance(c, LoRALinear):
            return None
        c.merge()
        if not unwrap:
            return None
        plain = nn.Linear(c.in_features, c.out_features, bias=c.bias is not None, device="meta")
        plain.weight, plain.bias = c.weight, c.bias
        return plain
    replace_children(module, merged)


def mark_only_lora_as_trainable(module):
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)


def lora_state_dict(module):
    """The adapter alone: every lora_A / lora_B, by their full names."""
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


# ----------------------------------------------------------------------------- the adapter files (stage 2)

def trainable_state(model):
    """Every trained tensor by its full model name, fp32, on the CPU (the adapter; train.py's checkpoint)."""
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def sha256_of(path):
    """Checksum of a model folder: sha256 over its weight files' bytes, in name order."""
    h = hashlib.sha256()
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors") and not f.startswith("adapter"):
            with open(os.path.join(path, f), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def save_adapter(model, out_dir, lora, base):
    """adapter.safetensors (LoRA A/B + every other trained tensor) + adapter.json, the format
    apply_adapter reads. lora: dict(r, alpha, dropout, targets); base: the model folder trained on."""
    save_file(trainable_state(model), os.path.join(out_dir, "adapter.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(out_dir, "adapter.safetensors.tmp"), os.path.join(out_dir, "adapter.safetensors"))
    meta = dict(lora, base=os.path.abspath(base), base_sha256=sha256_of(base))
    with open(os.path.join(out_dir, "adapter.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(out_dir, "adapter.json.tmp"), os.path.join(out_dir, "adapter.json"))


def adapter_files(adapter_file):
    """(adapter.safetensors, adapter.json beside it), checked to exist (chat.py checks before loading)."""
    meta_file = os.path.join(os.path.dirname(os.path.abspath(adapter_file)), "adapter.json")
    if not os.path.isfile(adapter_file):
        raise CheckpointError(f"{adapter_file}: no such adapter file")
    if not os.path.isfile(meta_file):
        raise CheckpointError(f"{meta_file}: missing (it holds the adapter's r, alpha and targets)")
    return adapter_file, meta_file


def read_adapter_meta(adapter_file):
    """adapter.json beside adapter_file, checked: r, alpha, targets (and dropout) of the right types."""
    meta_file = adapter_files(adapter_file)[1]
    meta = read_json(meta_file)
    ok = {"r": isinstance(meta.get("r"), int) and meta["r"] > 0,
          "alpha": isinstance(meta.get("alpha"), (int, float)),
          "dropout": isinstance(meta.get("dropout", 0.0), (int, float)),
          "targets": isinstance(meta.get("targets"), list) and all(isinstance(t, str) for t in meta["targets"])}
    bad = [k for k, good in ok.items() if not good]
    if bad:
        raise CheckpointError(f"{meta_file}: missing or invalid {', '.join(bad)} (r: a positive integer, "
                              f"alpha and dropout: numbers, targets: a list of layer names)")
    return meta


def check_adapter_base(adapter_file, base_dir):
    """Refuse an adapter trained on another base: adapter.json's base_sha256 (train.py writes it) must
    be the base folder's (one read of its weight files). An adapter.json without one is not checked."""
    meta = read_adapter_meta(adapter_file)
    want = meta.get("base_sha256")
    if want is not None and want != sha256_of(base_dir):
        raise CheckpointError(f"{adapter_file} was trained on another base model ({meta.get('base', '?')}, "
                              f"sha256 {str(want)[:12]}...), not {base_dir}: pass --ignore-adapter-base to apply "
                              f"it anyway")
    return meta


def apply_adapter(model, adapter_file):
    """Put the LoRA layers described by adapter.json (beside adapter_file) on the LLM and load the
    adapter's tensors (LoRA A/B and any other trained tensor, e.g. the abstractor), checked."""
    meta = read_adapter_meta(adapter_file)
    try:
        with safe_open(adapter_file, framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated or garbage file
        raise CheckpointError(f"{adapter_file}: cannot read safetensors ({e})") from None
    apply_lora(model.language_model, tuple(meta["targets"]), meta["r"], meta["alpha"], meta.get("dropout", 0.0))
    have = model.state_dict()
    want = {k: v.shape for k, v in have.items() if "lora_" in k or k in sd}  # every LoRA tensor, and what it trained
    check_keys(want, {k: v.shape for k, v in sd.items()}, adapter_file)
    with torch.no_grad():
        for k, v in sd.items():
            have[k].copy_(v)  # state_dict tensors share storage with the parameters; copy_ casts dtype
    return meta


MERGED = ("config.json", "model.safetensors", "tokenizer.model")  # what merge writes (owl.save_model)


def main(argv):
    ignore_base = "--ignore-adapter-base" in argv
    argv = [a for a in argv if a != "--ignore-adapter-base"]
    if len(argv) != 4 or argv[0] != "merge":
        sys.exit("usage: python -m owl.lora merge BASE_DIR ADAPTER_FILE OUT_DIR [--ignore-adapter-base]")
    _, base, adapter, out = argv
    try:  # everything is checked before the model is read: OUT is never the base or the adapter's folder
        check_destination(out, MERGED, sources=(base, os.path.dirname(os.path.abspath(adapter))))
        read_adapter_meta(adapter) if ignore_base else check_adapter_base(adapter, base)
        model, tok = load_model(base, dtype=None)
        apply_adapter(model, adapter)
        merge_lora(model)
        save_model(model, out, tokenizer_dir=base)
    except (CheckpointError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"merged {adapter} into {base} -> {out}")


if __name__ == "__main__":  # `python -m owl.lora`: owl/__init__.py imports this module lazily, so it runs once
    main(sys.argv[1:])
