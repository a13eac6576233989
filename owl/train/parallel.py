"""Processes, devices and precision for train.py: torchrun's ranks and the process group, a sum over
the processes, the mixed-precision policy, peak memory.
"""
import os
import resource
from contextlib import nullcontext

import torch
import torch.distributed as dist

def setup_processes(device_name):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    dev = device_name if device_name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if dev.startswith("cuda"):
        if world > 1 or dev == "cuda":  # one GPU per process: the local rank's
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    return rank, world, torch.device(dev)


def precision(kind, device):
    """(compute dtype, autocast context, grad scaler): bf16 where the GPU has it, else fp16 with a
    scaler; fp32 on the CPU. Trainable weights and the optimizer state stay fp32 in every case."""
    if kind == "auto":
        kind = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    ctx = nullcontext() if kind == "fp32" else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type) if kind == "fp16" else None
    return dtype, ctx, scaler


def all_sum(x, world, device):
    if world == 1:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def peak_mem_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (process RSS)
