"""LoRA (paper, "Joint Instruction Tuning": "we freeze the entire model and employ low-rank adaption
... to adapt fL"), as a drop-in wrapper of nn.Linear in the manner of microsoft/loralib:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A: (r, in), B: (out, r)

B starts at zero, so step 0 equals the base model. The base weight keeps its name (`q_proj.weight`)
so a model with LoRA still loads a base model folder; `merge()` folds BA into W for inference.
The official release applied it with peft to q_proj and v_proj, r=8, alpha=32, dropout 0.05.
The adapter files (what stage 2 saves) are adapter.py; the layer and its helpers are here.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    def __init__(self, in_features, out_features, r=8, alpha=32, dropout=0.05, bias=True, device=None, dtype=None,
                 lora_device=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.weight.requires_grad_(False)
        # A and B are fp32 (they are what trains) whatever the base weight's dtype
        lora_device = device if lora_device is None else lora_device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=lora_device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=lora_device))
        if self.lora_A.device.type != "meta":
            self.reset_lora()

    @torch.no_grad()
    def reset_lora(self):
        """Fresh A (kaiming, as loralib and peft) and B = 0, so the layer equals the base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r, alpha, dropout):
        """Wrap an existing layer, sharing (not copying) its weight and bias."""
        m = cls(linear.in_features, linear.out_features, r, alpha, dropout, bias=linear.bias is not None,
                device="meta", lora_device=linear.weight.device)  # the base: a placeholder for the layer's own
        m.weight, m.bias = linear.weight, linear.bias
        m.weight.requires_grad_(False)
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

