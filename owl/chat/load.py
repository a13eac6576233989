"""A model folder made ready to answer: the device and dtype, a stage-2 adapter (merged), the LLM's
projections fused (owl.llama.fuse_projections) or quantized to int8 / int4 (owl/quant.py). What
chat.py and `python -m owl.eval` share, options included (add_model_options), as gpt-fast's eval.py
shares its loader with generate.py.
"""
import sys

import torch

from ..adapter import apply_adapter, check_adapter_base, read_adapter_meta
from ..llama import fuse_projections
from ..lora import merge_lora
from ..quant import quantize
from ..weights import load_model


class UsageError(ValueError):
    """A bad option or argument: one line, before anything loads."""


def add_model_options(p):
    """The options that say which model to load and how (chat.py's and python -m owl.eval's)."""
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a model folder in the official layout (config.json, model.safetensors, tokenizer.model)")
    p.add_argument("--device", default="auto", help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="default: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on cpu")
    p.add_argument("--adapter", metavar="FILE", help="a stage-2 adapter.safetensors written by train.py "
                   "(adapter.json beside it)")
    p.add_argument("--ignore-adapter-base", action="store_true",
                   help="apply --adapter although adapter.json says it was trained on another base model")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only int8, or int4 in groups of 128 inputs, "
                   "for the LLM's linear layers (owl/quant.py): 7B chat in ~8.5 / ~5.6 GB instead of ~14.5")
    p.add_argument("--int8", dest="quantize", action="store_const", const="int8", help="the same as --quantize int8")


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use cuda, mps or cpu)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return dev


def pick_dtype(name, device):
    if name != "auto":
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def check_adapter(adapter, model_dir, ignore_base=False):
    """The adapter's files and its base, checked before the model is read (a 7B load takes a while)."""
    return read_adapter_meta(adapter) if ignore_base else check_adapter_base(adapter, model_dir)


def load(model_dir, *, device="auto", dtype="auto", adapter=None, ignore_adapter_base=False, quantize_to=None):
    """(model, tokenizer) in eval mode, with a progress bar over the weights on stderr. An adapter is
    merged into the weights (inference only: one matmul per projection, not three); then q/k/v and
    gate/up are fused, and with quantize_to ("int8" or "int4") every linear layer of the LLM but its
    head is quantized on the device."""
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    if adapter:
        check_adapter(adapter, model_dir, ignore_adapter_base)
    model, tok = load_model(model_dir, device=device, dtype=dtype, progress=True)
    if adapter:
        apply_adapter(model, adapter)  # (every way it can fail is a WeightsError naming the file)
        merge_lora(model)
    if quantize_to:
        try:
            quantize(model, quantize_to)  # (fuses first)
        except ValueError as e:  # no int4 group size fits the model's widths
            raise UsageError(f"--quantize {quantize_to}: {e}") from None
    else:
        fuse_projections(model)
    print(f"loaded {model_dir} on {device} ({str(dtype).replace('torch.', '')})", file=sys.stderr)
    return model.eval(), tok
