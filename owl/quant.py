"""Weight-only int8 and int4 for the LLaMA linear layers (not in the paper: inference options,
`chat.py --quantize int8|int4`; `quantize` below is the one entry).

int8: each nn.Linear of model.language_model becomes an Int8Linear: the weight W (out, in) is stored
as int8 with one scale per output channel, W ~= W_q * s[:, None], s = max|W_row| / 127 (symmetric,
round to nearest). Activations stay in the model's dtype, so no calibration data is needed. This is
gpt-fast's `WeightOnlyInt8Linear` in plain PyTorch; the official code's 8-bit path needed bitsandbytes.

int4: an Int4Linear stores 4-bit weights in groups of `group_size` inputs of a row, each group with
its own scale and zero (asymmetric: W ~= (q - 8) * s + z, q in 0..15), and multiplies with PyTorch's
own int4 kernels: `_weight_int4pack_mm` on CUDA (tinygemm, as gpt-fast and torchao use it) and
`_weight_int4pack_mm_for_cpu` on the CPU, both with bf16 activations, scales and zeros (the CPU
kernel takes fp32 too, but runs 30x slower with it). The packed layout is the kernel's, so a model is
quantized on the device it runs on (the packing differs between CPU and CUDA). 0.53 bytes a weight at
group 128 (the 4 bits, a bf16 scale and zero per group), a quarter of bf16.

What it is for: memory, and speed where the matmul reads the quantized weight directly. Decoding at
batch 1 reads every weight once per token, so fewer bytes a weight lower the bandwidth bound. On the
CPU, PyTorch's weight-only int8 kernel `_weight_int8pack_mm` (a private op, used when present) does
that, with the activations rounded to bf16 (an error of the same order as the weight rounding):
1.0-1.5x the fp32 decode speed in bench/RESULTS.md. On a GPU the int8 path is `F.linear(x, W_q) * s`
(gpt-fast's form) and only pays under torch.compile with inductor's `coordinate_descent_tuning`
(owl.generate.compile_options sets it for the decode step): then inductor turns the one-row matmul
into a reduction that reads the int8 weight and converts it in registers. Without it the matmul goes
to cuBLAS, and the bf16 copy of every weight is written out and read back each token: that is why
the first H200 run measured int8 at 0.10x bf16 (issue 23). In eager mode on a GPU int8 is slower
than bf16; int4's kernel reads the packed weight in both modes.

lm_head stays in the model's dtype by default (lm_head=True quantizes it too). It is 2% of LLaMA-7B's
weights, so quantizing it saves little there, and keeping it means the logits that sampling sees carry
only the error of the layers below. For small models it is a large share (28% of the 57M benchmark
shape), and bench/run.py measures both. (Llama.setup_caches takes the cache dtype from
embed_tokens, so a quantized lm_head does not change it.) embed_tokens is not quantized: a lookup
reads one row per token, so it would save memory but no time. The ViT and the abstractor run once
per image and stay as they are.

A quantized model is for inference only: it cannot be trained or saved with owl.save_model.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .llama import fuse_projections
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


# ----------------------------------------------------------------------------- int4, in groups

def quantize_weight_int4(w, group_size, dtype=torch.bfloat16):  # w (out, in)
    """Asymmetric 4-bit per group of `group_size` consecutive inputs of a row (gpt-fast's and
    torchao's int4 weight-only scheme): (q uint8 (out, in) in 0..15, scales (out, in / g), zeros
    (out, in / g)) with W ~= (q - 8) * s + z. s = (max - min) / 15 and z = min + 8 s are rounded to
    `dtype` (what the kernel reads) before q is computed from them, so q fits the stored s and z."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4: in_features {K} is not a multiple of group_size {group_size}")
    g = w.detach().float().reshape(N, K // group_size, group_size)  # (out, groups, g)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(dtype)
    zeros = (lo + 8 * scales.float()).to(dtype)
    base = zeros.float() - 8 * scales.float()  # the value q = 0 stands for
    q = ((g - base) / scales.float()).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    return q, scales.reshape(N, -1), zeros.reshape(N, -1)


def int4_dequantize(q, scales, zeros):  # q (out, in) in 0..15; scales, zeros (out, in / g)
    """The weight the int4 kernels multiply by, in fp32 (the reference in tests)."""
    N, K = q.shape
    g = q.float().reshape(N, scales.shape[1], -1)  # (out, groups, g)
    return ((g - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K)


def pack_int4(q, inner_k_tiles):  # q (out, in) uint8 in 0..15, on the device it will run on
    """The kernel's layout. CUDA takes two values a byte, the even input in the high nibble
    (torch >= 2.5; gpt-fast and torchao pack it so) and returns int32 tiles (out / 8, in /
    (16 inner_k_tiles), 32, inner_k_tiles / 2); the CPU kernel packs an int32 (out, in) itself."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), inner_k_tiles)  # (out, in/2)
    return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), inner_k_tiles)


@torch.library.custom_op("owl::int4_mm_cpu", mutates_args=())
def int4_mm_cpu(x: torch.Tensor, w: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The CPU kernel as an opaque op: inductor's own lowering of `_weight_int4pack_mm_for_cpu` fails
    on a fused input (torch 2.13: "AssertionError: Pointwise"); an opaque op gets its inputs realized."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group_size, scales_and_zeros)


@int4_mm_cpu.register_fake
def _(x, w, group_size, scales_and_zeros):
    return x.new_empty(x.shape[0], scales_and_zeros.shape[1])


class Int4Linear(nn.Module):
    """y = x W^T with W in 4-bit groups, packed for the device's int4 kernel (no bias)."""

    def __init__(self, in_features, out_features, group_size=128, device=None, dtype=torch.bfloat16):
        super().__init__()
        device = torch.device(device or "cpu")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.inner_k_tiles = next(t for t in (8, 4, 2, 1) if t == 1 or in_features % (16 * t) == 0)
        if device.type == "cuda" and (self.inner_k_tiles == 1 or out_features % 8 or group_size not in (32, 64, 128, 256)):
            raise ValueError(f"int4 on CUDA needs in_features a multiple of 32 ({in_features}), out_features of 8 "
                             f"({out_features}) and group_size 32, 64, 128 or 256 ({group_size})")
        self.packed_for = device.type  # the layout of `weight`: moving the module elsewhere would misread it
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                             dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size=128):
        if linear.bias is not None:
            raise ValueError("Int4Linear has no bias; LLaMA's linear layers have none")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, group_size, device=w.device, dtype=w.dtype)
        q, scales, zeros = quantize_weight_int4(w, group_size)
        m.weight = pack_int4(q, max(m.inner_k_tiles, 2))
        m.scales_and_zeros.copy_(torch.stack([scales, zeros], -1).transpose(0, 1))  # (in / g, out, 2)
        return m

    def forward(self, x):  # x (..., in)
        if x.device.type != self.packed_for:
            raise RuntimeError(f"this Int4Linear was packed for {self.packed_for}, not {x.device.type}: quantize "
                               f"the model on the device it runs on")
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, in)
        mm = int4_mm_cpu if self.packed_for == "cpu" else torch.ops.aten._weight_int4pack_mm
        y = mm(x2, self.weight, self.group_size, self.scales_and_zeros)  # (M, out), bf16
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group_size={self.group_size}"


KINDS = ("int8", "int4")


def quantize(model, kind, group_size=None, lm_head=False, fuse=True):
    """The one entry (chat.py --quantize int8|int4): LoRA adapters merged, the projections fused
    (owl.llama.fuse_projections; fuse=False keeps them apart), then every nn.Linear of
    model.language_model (an MplugOwl, or a Llama), lm_head only with lm_head=True, replaced in place
    by an Int8Linear or an Int4Linear (group_size: int4's group of inputs; it must divide in_features;
    None: 128, gpt-fast's for 7B, or the largest of 64, 32 that divides every layer's in_features).
    Quantize on the device the model runs on (int4's packing is the device's). Returns the model."""
    if kind not in KINDS:
        raise ValueError(f"quantize: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    llm = getattr(model, "language_model", model)
    if any(isinstance(m, LoRALinear) for m in llm.modules()):
        merge_lora(llm)
    if fuse:
        fuse_projections(llm)
    head = None if lm_head else getattr(llm, "lm_head", None)
    if kind == "int4" and group_size is None:
        widths = {c.in_features for c in llm.modules() if isinstance(c, nn.Linear) and c is not head}
        group_size = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), None)
        if group_size is None:
            raise ValueError(f"int4: no group of 128, 64 or 32 inputs divides the layers' widths {sorted(widths)}")
    make = Int8Linear.from_linear if kind == "int8" else lambda c: Int4Linear.from_linear(c, group_size)
    replace_children(llm, lambda name, c: make(c) if isinstance(c, nn.Linear) and c is not head else None)
    return model


def weight_bytes(module):
    """Bytes of all parameters and buffers (what the model holds), without the KV caches."""
    n = sum(p.numel() * p.element_size() for p in module.parameters())
    return n + sum(b.numel() * b.element_size() for name, b in module.named_buffers() if "kv_cache" not in name)
