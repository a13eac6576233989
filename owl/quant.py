"""Weight-only int8 for the LLaMA linear layers (not in the paper: an inference option, `chat.py --int8`).

Each nn.Linear of model.language_model becomes an Int8Linear: the weight W (out, in) is stored as
int8 with one scale per output channel, W ~= W_q * s[:, None], s = max|W_row| / 127 (symmetric,
round to nearest). Activations stay in the model's dtype, so no calibration data is needed. This is
gpt-fast's `WeightOnlyInt8Linear` in plain PyTorch; the official code's 8-bit path needed bitsandbytes.

What it is for: memory, and speed where the matmul reads the int8 weight directly. Decoding at batch
1 reads every weight once per token, so 1 byte per weight instead of 2 (bf16) or 4 (fp32) lowers the
bandwidth bound. On the CPU, PyTorch's weight-only int8 kernel `_weight_int8pack_mm` (a private op,
used when present) does that, with the activations rounded to bf16 (an error of the same order as the
weight rounding): 1.0-1.5x the fp32 decode speed in bench/RESULTS.md. Elsewhere, and for prompts, we
dequantize and multiply (`F.linear(x, W_q) * s`): torch.compile fuses that on a GPU; in eager mode
it is slower than the unquantized model.

lm_head stays in the model's dtype by default (lm_head=True quantizes it too). It is 2% of LLaMA-7B's
weights, so int8 would save little there, and keeping it means the logits that sampling sees carry
only the error of the layers below. For small models it is a large share (28% of the 57M benchmark
shape), and bench/run.py measures both. (Llama.setup_caches takes the cache dtype from
embed_tokens, so an int8 lm_head does not change it.) embed_tokens is not quantized: a lookup reads
one row per token, so int8 would save memory but no time. The ViT and the abstractor run once per
image and stay as they are.

Int8 is for inference only: a quantized model cannot be trained or saved with owl.save_model.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import LoRALinear, merge_lora, replace_children


def quantize_weight(w):  # w (out, in), any float dtype
    """Symmetric per-output-channel int8: (W_q int8 (out, in), scales fp32 (out,)), W ~= W_q * s."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): the largest |w| of a row maps to 127
    w_q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return w_q, scales


def int8_matmul_reference(x, w_q, scales):  # x (..., in)
    """x @ (W_q * s)^T computed as (x @ W_q^T) * s: the scale of an output channel factors out."""
    return F.linear(x, w_q.to(x.dtype)) * scales.to(x.dtype)  # (..., out)


HAS_INT8_MM = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def cpu_int8_kernel_ok(x):
    """PyTorch's CPU weight-only int8 kernel takes bf16 activations; it is fast for a few rows
    (decoding: 2-5x fp32 at one row) and slow for many (a prompt: 2x slower), where dequantizing wins.
    Not under torch.compile: inductor's lowering of it fails on CPU (torch 2.13: "LoweringException:
    AssertionError: Pointwise" when its input is a fused expression), so a compiled step dequantizes."""
    return (x.device.type == "cpu" and HAS_INT8_MM and x.numel() // x.shape[-1] <= 8
            and not torch.compiler.is_compiling())


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 + a scale per output channel (no bias: LLaMA has none)."""

    def __init__(self, in_features, out_features, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; LLaMA's linear layers have none")
        w_q, scales = quantize_weight(linear.weight)
        q = cls(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight.copy_(w_q)
        q.scales.copy_(scales.to(q.scales.dtype))
        return q

    def forward(self, x):  # x (..., in)
        if cpu_int8_kernel_ok(x):
            # reads the int8 weight directly; the activations are rounded to bf16 on the way in
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, in)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(torch.bfloat16))  # (M, out)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., out)
        return int8_matmul_reference(x, self.weight, self.scales)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model, lm_head=False):
    """Replace every nn.Linear of model.language_model (an MplugOwl; or a Llama itself) by an Int8Linear,
    in place. LoRA adapters are merged into their base weights first. Returns the model."""
    llm = getattr(model, "language_model", model)
    if any(isinstance(m, LoRALinear) for m in llm.modules()):
        merge_lora(llm)  # an adapter must be folded in: Int8Linear has no place for it
    head = None if lm_head else getattr(llm, "lm_head", None)
    replace_children(llm, lambda name, c: Int8Linear.from_linear(c)
                     if isinstance(c, nn.Linear) and c is not head else None)
    return model


def weight_bytes(module):
    """Bytes of all parameters and buffers (what the model holds), without the KV caches."""
    n = sum(p.numel() * p.element_size() for p in module.parameters())
    return n + sum(b.numel() * b.element_size() for name, b in module.named_buffers() if "kv_cache" not in name)
