"""One GPU check, one table (bench/gpu_check.sh runs it; <= 8 minutes on one H100-class GPU).

  python bench/gpu_check.py                                   # CUDA, 7B shapes, random weights
  python bench/gpu_check.py --device cpu --shape tiny --no-tests --no-compile   # the smoke run (a test)

Rows: the CUDA test suite (tests/test_device.py); the bandwidth of a device-to-device copy; 7B decode
at batch 1, eager and compiled (CUDA graphs), tok/s and % of the bandwidth bound, and HF eager when
transformers is installed; time to first token for one image + 64 tokens; peak memory of a 2k-token
chat next to owl/memory.py's estimate; stage-1 and stage-2 training tok/s, MFU (FLOPs counted by
torch.utils.flop_counter.FlopCounterMode) and peak memory, with gradient checkpointing; one NCCL DDP
step in one process. Nothing is downloaded: the weights are random, HF's model is built from a config.
"""
import argparse
import copy
import os
import socket
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import owl  # noqa: E402
import bench_train  # noqa: E402
import run as bench_run  # noqa: E402
from harness import build, hf_twin, sync, transformers  # noqa: E402
from owl.generate import compiled_decode_one_token, decode_one_token, generate_tokens  # noqa: E402
from owl.llama import cache_length  # noqa: E402
from owl.memory import estimate  # noqa: E402

# Dense bf16 tensor-core peaks (spec sheets), for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 756.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}
SIZES = {  # shape: (config, prompt, new tokens, chat context, (stage-1 batch, tokens), (stage-2 batch, tokens))
    "7b": ("owl-7b", 64, 128, 2048, (16, 128), (4, 2048)),
    "tiny": ("tiny", 16, 8, 256, (1, 96), (1, 128)),
}


def timed(fn, device, repeats=3):
    """Median seconds of `repeats` calls after one warm-up call; and the warm-up's result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def copy_bandwidth(device, mib):
    """GB/s of a device-to-device copy (read + write), the HBM's usable bandwidth."""
    x = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t, _ = timed(lambda: y.copy_(x), device, repeats=10)
    return 2 * x.numel() / t / 1e9


def decode(model, ids, new, decode_fn):
    llm = model.language_model
    llm.setup_caches(ids.shape[0], ids.shape[1] + new)
    try:
        return generate_tokens(model, ids, max_new_tokens=new, eos_id=-1, decode=decode_fn)
    finally:
        llm.reset_caches()


def decode_rows(model, hf, ids, new, device, bw, compile):
    """tok/s of the decode steps alone: (time of `new` tokens - time of 1) / (new - 1)."""
    llm, rows, got = model.language_model, [], {}
    L = cache_length(ids.shape[1] + new, llm.config.max_position_embeddings)
    kv = 2 * llm.config.num_hidden_layers * L * llm.config.num_key_value_heads * llm.config.head_dim * 2
    need = bench_run.bytes_per_token(llm) + kv  # weights (one embedding row) + the whole static cache
    fns = {"eager": decode_one_token}
    if compile:
        fns["compiled"] = compiled_decode_one_token(device.type)
    for name, fn in fns.items():
        t_all, got[name] = timed(lambda: decode(model, ids, new, fn), device)
        t_one, _ = timed(lambda: decode(model, ids, 1, fn), device)
        tps = (new - 1) / (t_all - t_one)
        got[name + "_tps"] = tps
        note = f"{tps * need / bw / 1e9:.0%} of the bound ({bw * 1e9 / need:.0f} tok/s at {bw:.0f} GB/s, " \
               f"{need / 1e6:.0f} MB/token)"
        if name == "compiled":
            skips = dict(torch._dynamo.utils.counters["inductor"]).get("cudagraph_skips", 0)
            note += f"; same ids as eager: {got['compiled'] == got['eager']}; cudagraph skips: {skips}"
        rows.append((f"decode b=1 {name} (tok/s)", f"{tps:.1f}", note))
    if hf is not None:
        def hf_generate(n):
            with torch.inference_mode():
                return hf.generate(ids, max_new_tokens=n, do_sample=False)
        t_all, _ = timed(lambda: hf_generate(new), device)
        t_one, _ = timed(lambda: hf_generate(1), device)
        tps = (new - 1) / (t_all - t_one)
        best = got.get("compiled_tps", got["eager_tps"])
        rows.append(("decode b=1 HF eager (tok/s)", f"{tps:.1f}", f"owl {'compiled' if compile else 'eager'} / HF: "
                     f"{best / tps:.2f}x (target >= 3x compiled)"))
    else:
        rows.append(("decode b=1 HF eager (tok/s)", "-", "transformers not installed (bench/requirements.txt)"))
    return rows


def chat_memory(model, context, device, dtype):
    """Peak memory of a chat that fills the context (one image), next to owl.memory's estimate."""
    if device.type != "cuda":
        return ("peak memory, chat at %d tokens (GB)" % context, "-", "CUDA only (tests/test_memory.py on CPU)")
    _, gb, _, _ = bench_run.chat_memory_row(model, device, context)
    est = estimate(model.config, "chat", dtype=dtype, context=context)["total"] / 2 ** 30
    return (f"peak memory, chat at {context} tokens (GB)", f"{gb:.2f}", f"owl.memory estimate {est:.2f} GB "
            f"(target <= 15.5 at 7B)")


def train_rows(preset, device, dtype_name, sizes, peak_tflops):
    """Per stage: FLOPs of one step counted without checkpointing at batch 1 (model FLOPs, scaled to
    the batch), then the step timed with gradient checkpointing (bench/bench_train.py's loop)."""
    from torch.utils.flop_counter import FlopCounterMode
    from owl.model import lm_loss_sum
    rows = []
    for stage, (B, T) in zip((1, 2), sizes):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        model = bench_train.build(preset, stage, device, dtype, grad_ckpt=False)
        ids, px, labels = bench_train.batch(model.config, 1, T, device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        with FlopCounterMode(display=False) as counter:
            with autocast:
                loss, n = lm_loss_sum(model(ids, px), labels)
            (loss / n).backward()
        flops = counter.get_total_flops() * B
        del model, loss
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = bench_train.bench(preset, stage, B, T, 3, device, dtype_name)  # checkpointing on CUDA
        mfu = f"{flops / r['step_s'] / (peak_tflops * 1e12):.0%}" if peak_tflops else "n/a (unknown peak)"
        est = estimate(owl.preset(preset), f"stage{stage}", dtype=dtype_name, context=T, batch=B,
                       grad_checkpointing=device.type == "cuda")["total"] / 2 ** 30
        rows.append((f"train stage {stage}, {B} x {T} tok (tok/s)", f"{r['tok_per_s']:.0f}",
                     f"MFU {mfu} ({flops / 1e12:.2f} TFLOP/step); peak mem {r['peak_mem_gb']:.2f} GB"
                     f"{'' if device.type == 'cuda' else ' (RSS)'}, owl.memory "
                     f"{est:.2f} GB; {r['trainable']:,} trainable" + ("; target MFU >= 40%" if stage == 1 else "")))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ddp_row(device):
    """One train_step through DistributedDataParallel in a one-process group (NCCL on CUDA, gloo on
    the CPU) equals the same step without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import train
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
        return ("DDP step, 1 process", backend, f"loss {loss:.3f}; max |param difference| vs no DDP {same:.1e}")
    finally:
        dist.destroy_process_group()


def suite_row(device):
    env = dict(os.environ, OWL_TEST_DEVICE=device.type)
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    last = (r.stdout.strip().splitlines() or ["?"])[-1]
    return ("tests/test_device.py on " + device.type, "ok" if r.returncode == 0 else "FAILED",
            f"{last} ({time.time() - t:.0f} s): fp32 ids, bf16 within tolerance, batched, compiled")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="7b", choices=SIZES)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: from its name)")
    p.add_argument("--no-tests", action="store_true", help="skip tests/test_device.py")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled decode")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is visible (--device cpu --shape tiny for the smoke run)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    preset, prompt, new, context, s1, s2 = SIZES[a.shape]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    t0 = time.time()
    rows = []
    if not a.no_tests:
        rows.append(suite_row(device))
    bw = copy_bandwidth(device, 1024 if device.type == "cuda" else 64)
    rows.append(("device-to-device copy (GB/s)", f"{bw:.0f}", "read + write of 1 GiB" if device.type == "cuda" else "64 MiB"))
    model = build(owl.preset(preset), device, dtype)
    rows.append(chat_memory(model, context, device, a.dtype))  # first: nothing else on the GPU yet
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.text_config.vocab_size, (1, prompt), generator=g).to(device)
    hf = hf_twin(model.language_model, device) if transformers else None
    rows += decode_rows(model, hf, ids, new, device, bw, a.compile)
    ms, _ = timed(lambda: bench_run.ttft_owl(model, torch.cat(
        [ids[:, :1], torch.full((1, model.config.image_tokens), -1, device=device), ids[:, 1:]], dim=1),
        torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size,
                    device=device, dtype=dtype)), device, repeats=5)
    rows.append((f"first token, 1 image + {prompt} tok (ms)", f"{1e3 * ms:.1f}", "target <= 50 ms on an H100"))
    del model, hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += train_rows(preset, device, a.dtype, (s1, s2), peak)
    rows.append(ddp_row(device))
    print(f"\nowl GPU check: {name}, torch {torch.__version__}, {preset} shapes, {a.dtype}, random weights; "
          f"{time.time() - t0:.0f} s")
    print(f"| {'what':<44} | {'value':>9} | notes\n|{'-' * 46}|{'-' * 11}|------")
    for what, value, note in rows:
        print(f"| {what:<44} | {value:>9} | {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
