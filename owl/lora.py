"""LoRA (paper, "Joint Instruction Tuning": "we freeze the entire model and employ low-rank adaption
... to adapt fL"), as a drop-in wrapper of nn.Linear in the manner of microsoft/loralib:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   A: (r, in), B: (out, r)

B starts at zero, so step 0 equals the base model. The base weight keeps its name (`q_proj.weight`)
so a model with LoRA still loads base checkpoints; `merge()` folds BA into W for inference.
The official release applied it with peft to q_proj and v_proj, r=8, alpha=32, dropout 0.05.

    python -m owl.lora merge BASE_DIR ADAPTER_FILE OUT_DIR   # fold a stage-2 adapter into a model
"""
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    def __init__(self, in_features, out_features, r=8, alpha=32, dropout=0.05, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # A and B stay fp32 (they are what trains) whatever the base weight's dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.weight.requires_grad_(False)
        if self.lora_A.device.type != "meta":
            self.reset_lora()

    def reset_lora(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as loralib and peft
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r, alpha, dropout):
        """Wrap an existing layer, sharing (not copying) its weight and bias."""
        m = cls(linear.in_features, linear.out_features, r, alpha, dropout, bias=linear.bias is not None,
                device="meta")
        m.weight, m.bias = linear.weight, linear.bias
        m.weight.requires_grad_(False)
        dev = linear.weight.device
        m.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=dev))
        m.lora_B = nn.Parameter(torch.zeros(linear.out_features, r, device=dev))
        m.reset_lora()
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


def apply_lora(module: nn.Module, targets=("q_proj", "v_proj"), r=8, alpha=32, dropout=0.05):
    """Replace every nn.Linear whose name ends in one of `targets` by a LoRALinear; returns the names."""
    done = []
    for name, child in list(module.named_modules()):
        for cname, sub in list(child.named_children()):
            if cname in targets and type(sub) is nn.Linear:
                setattr(child, cname, LoRALinear.from_linear(sub, r, alpha, dropout))
                done.append(f"{name}.{cname}" if name else cname)
    if not done:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} to put LoRA on")
    return done


def lora_layers(module):
    return [m for m in module.modules() if isinstance(m, LoRALinear)]


def merge_lora(module, unwrap=True):
    """Fold every adapter into its base weight; with unwrap, put plain nn.Linear layers back."""
    for name, child in list(module.named_modules()):
        for cname, sub in list(child.named_children()):
            if isinstance(sub, LoRALinear):
                sub.merge()
                if unwrap:
                    plain = nn.Linear(sub.in_features, sub.out_features, bias=sub.bias is not None, device="meta")
                    plain.weight, plain.bias = sub.weight, sub.bias
                    setattr(child, cname, plain)


def mark_only_lora_as_trainable(module):
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)


def lora_state_dict(module):
    """The adapter alone: every lora_A / lora_B, by their full names."""
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


def main(argv):
    if len(argv) != 4 or argv[0] != "merge":
        sys.exit("usage: python -m owl.lora merge BASE_DIR ADAPTER_FILE OUT_DIR")
    from .checkpoint import load_model, apply_adapter, save_model, CheckpointError
    _, base, adapter, out = argv
    try:
        model, tok = load_model(base, dtype=None)
        apply_adapter(model, adapter)
        merge_lora(model)
        save_model(model, out, tokenizer_dir=base)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"merged {adapter} into {base} -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
