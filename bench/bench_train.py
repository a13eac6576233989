"""Benchmark one optimizer step of each stage: tokens/s and peak memory (not a test).

  python bench/bench_train.py                      # tiny config on the CPU
  python bench/bench_train.py --preset owl-7b      # 7B-shaped, random weights, bf16 (CUDA)
  python bench/bench_train.py --preset owl-7b --compile   # + regional compilation (owl.model.compile_blocks)

It builds the model from a preset with random weights (no checkpoint needed), freezes it as train.py
does (owl/train/stages.py), and times forward + backward + AdamW on synthetic batches:
stage 1 = one image + a caption per row, stage 2 = one image + a long instruction per row.
Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak RSS (coarse:
it includes the Python runtime and everything allocated before). On CUDA gradient checkpointing is
what owl.memory.grad_checkpointing_rule picks for the free memory (train.py's --grad-checkpointing
auto) and AdamW is the fused one; --compile adds regional compilation of the blocks.
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import owl  # noqa: E402
from owl.lora import apply_lora  # noqa: E402
from owl.memory import grad_checkpointing_rule  # noqa: E402
from owl.model import compile_blocks, lm_loss_sum  # noqa: E402
from owl.tokenizer import IGNORE, IMAGE_SLOT  # noqa: E402
from owl.train.stages import cast_frozen, param_groups, set_trainable, train_mode  # noqa: E402


def peak_mem_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB -> GiB (process RSS)


def auto_checkpointing(preset, stage, B, T, device, precision):
    """(on, why): train.py's --grad-checkpointing auto for this run (off on the CPU: no device limit)."""
    if device.type != "cuda":
        return False, "gradient checkpointing off (CPU)"
    free = torch.cuda.mem_get_info(device)[0]
    return grad_checkpointing_rule(owl.preset(preset), f"stage{stage}", B, T, precision, free,
                                   lora_dropout=0.0)


def build(preset, stage, device, dtype, grad_ckpt):
    cfg = owl.preset(preset)
    with torch.device("meta"):
        model = owl.MplugOwl(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    if stage == 2:
        apply_lora(model.language_model, ("q_proj", "v_proj"), 8, 32, 0.0)
    set_trainable(model, stage)
    cast_frozen(model, dtype)
    model.vision_model.grad_checkpointing = model.language_model.grad_checkpointing = grad_ckpt
    train_mode(model, stage)
    return model


def batch(cfg, B, T, device):
    """B rows of T tokens, each with one image at positions 1..65; loss on the text after the image."""
    n = cfg.image_tokens
    ids = torch.randint(3, cfg.text_config.vocab_size, (B, T), device=device)
    ids[:, 1:1 + n] = IMAGE_SLOT
    labels = ids.clone()
    labels[:, :1 + n] = IGNORE
    px = torch.randn(B, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=device)
    return ids, px, labels


def bench(preset, stage, B, T, steps, device, precision, grad_ckpt=None, compile=False):
    """grad_ckpt None: the auto rule (auto_checkpointing). The first two steps are warm-up (compile)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    why = f"gradient checkpointing {'on' if grad_ckpt else 'off'} (asked)"
    if grad_ckpt is None:
        grad_ckpt, why = auto_checkpointing(preset, stage, B, T, device, precision)
    model = build(preset, stage, device, dtype, grad_ckpt=grad_ckpt)
    if compile:
        compile_blocks(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.98), fused=device.type == "cuda")
    ids, px, labels = batch(model.config, B, T, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 2):  # two warm-up steps (lazy kernel set-up)
        t0 = time.perf_counter()
        with autocast:
            loss, n = lm_loss_sum(model(ids, px), labels)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    dt = sorted(times[2:])[steps // 2]  # the median: a shared machine adds outliers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"stage": stage, "preset": preset, "batch": B, "seq": T, "trainable": trainable,
            "step_s": dt, "tok_per_s": B * T / dt, "peak_mem_gb": peak_mem_gb(device), "grad_ckpt": grad_ckpt,
            "why": why, "warmup_s": times[0] + times[1] - 2 * dt}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq1", type=int, default=128, help="stage-1 tokens per row (image + caption)")
    p.add_argument("--seq2", type=int, default=None, help="stage-2 tokens per row (default 512 tiny, 2048 7B)")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--threads", type=int, help="CPU threads (on a small shared CPU, 1 is the stable choice)")
    p.add_argument("--compile", action="store_true", help="regional compilation of the blocks (owl.model.compile_blocks)")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.preset != "tiny" and device.type != "cuda":
        sys.exit("error: the 7B-shaped benchmark needs a CUDA GPU")
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    seq2 = a.seq2 or (512 if a.preset == "tiny" else 2048)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}, precision {precision}, torch {torch.__version__}")
    for stage, T in ((1, a.seq1), (2, seq2)):
        r = bench(a.preset, stage, a.batch_size, T, a.steps, device, precision, compile=a.compile)
        print(f"stage {r['stage']} {r['preset']}: micro-batch {r['batch']} x {r['seq']} tokens, "
              f"{r['trainable']:,} trainable; {r['step_s'] * 1000:.0f} ms/step, {r['tok_per_s']:.0f} tok/s, "
              f"peak mem {r['peak_mem_gb']:.2f} GB; {r['why']}")


if __name__ == "__main__":
    main()
