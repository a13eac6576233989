"""The training, DDP and test-suite sections of bench/gpu_check.py (gpu_rows.py has the others)."""
import copy
import os
import socket
import subprocess
import sys
import time

import torch

import bench_train
import owl
from owl.memory import estimate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def section_train(ctx, sizes, stage):
    from torch.utils.flop_counter import FlopCounterMode
    from owl.model import lm_loss_sum
    B, T = sizes
    dev, dtype = ctx.device, ctx.dtype
    model = bench_train.build(ctx.preset, stage, dev, dtype, grad_ckpt=False)
    ids, px, labels = bench_train.batch(model.config, 1, T, dev)
    with FlopCounterMode(display=False) as counter:  # model FLOPs, no recompute; one row, scaled to the batch
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, n = lm_loss_sum(model(ids, px), labels)
        (loss / n).backward()
    flops = counter.get_total_flops() * B
    del model, loss
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    r = bench_train.bench(ctx.preset, stage, B, T, 3, dev, ctx.dtype_name, grad_ckpt=None, compile=ctx.compile)
    mfu = f"{flops / r['step_s'] / (ctx.peak_tflops * 1e12):.0%}" if ctx.peak_tflops else "n/a (unknown peak)"
    est = estimate(owl.preset(ctx.preset), f"stage{stage}", dtype=ctx.dtype_name, context=T, batch=B,
                   grad_checkpointing=r["grad_ckpt"], lora_dropout=0.0)["total"] / 2 ** 30
    ctx.tab.add(f"train stage {stage}, {B} x {T} tok (tok/s)", f"{r['tok_per_s']:.0f}",
                f"MFU {mfu} (target >= 45%; {flops / 1e12:.2f} TFLOP/step); {r['why']}; "
                f"{'regional compile (warm-up %.0f s), ' % r['warmup_s'] if ctx.compile else ''}"
                f"{'fused AdamW; ' if dev.type == 'cuda' else ''}peak {r['peak_mem_gb']:.2f} GB"
                f"{'' if dev.type == 'cuda' else ' (RSS)'}, owl.memory {est:.2f} GB; {r['trainable']:,} trainable")


def section_train1(ctx, sizes):
    section_train(ctx, sizes, 1)


def section_train2(ctx, sizes):
    section_train(ctx, sizes, 2)


def section_ddp(ctx):
    """One train_step through DistributedDataParallel in a one-process group (NCCL on CUDA, gloo on
    the CPU) equals the same step without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import train
    device = ctx.device
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        base = bench_train.build("tiny", 1, device, torch.float32, grad_ckpt=False)
        ids, px, labels = bench_train.batch(base.config, 2, 96, device)
        micro = [{"input_ids": ids, "labels": labels, "pixel_values": px}]
        after = []
        for wrap in (False, True):
            model = copy.deepcopy(base)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-3)
            torch.manual_seed(0)  # the same dropout in both runs
            net = DDP(model, device_ids=[device.index or 0] if device.type == "cuda" else None,
                      find_unused_parameters=True) if wrap else model
            loss = train.train_step(net, opt, None, micro, params, world=1, device=device,
                                    autocast=torch.autocast(device.type, enabled=False), grad_clip=1.0)
            after.append(torch.cat([p.detach().flatten() for p in params]))
        same = float((after[0] - after[1]).abs().max())
        ctx.tab.add("DDP step, 1 process", backend, f"loss {loss:.3f}; max |param difference| vs no DDP {same:.1e}")
    finally:
        dist.destroy_process_group()


def section_suite(ctx):
    env = dict(os.environ, OWL_TEST_DEVICE=ctx.device.type)
    t = time.time()
    limit = max(30, ctx.tab.left() - 5)
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py",
                            "tests/test_device_fast.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        last, ok = (r.stdout.strip().splitlines() or ["?"])[-1], r.returncode == 0
        if not ok:
            print(r.stdout[-4000:], r.stderr[-2000:], flush=True)
    except subprocess.TimeoutExpired:
        last, ok = f"cut at {limit:.0f} s", False
    ctx.tab.add("tests/test_device*.py on " + ctx.device.type, "ok" if ok else "FAILED",
                f"{last} ({time.time() - t:.0f} s): fp32 ids, bf16 within tolerance, batched, compiled; fused, new loop, "
                f"int8/int4 kernels vs their dequantized weights, compiled prefill")
