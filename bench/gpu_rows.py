"""The sections of bench/gpu_check.py (its docstring says what each row means): each measures, prints
its rows through ctx.tab as it goes, and keeps a profile table for the end. Training, DDP and the
test suite: gpu_train_rows.py."""
import copy
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import run as bench_run
from harness import hf_twin, sync, transformers
import owl
from owl.generate import (compiled_decode_step, compiled_encode, compiled_prefill, decode_step,
                          encode_images, generate, generate_tokens, prefill)
from owl.llama import cache_length
from owl.memory import estimate
from owl.quant import Int4Linear, Int8Linear, int4_dequantize, quantize, quantize_weight_int4, weight_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Context:
    tab: object
    device: torch.device
    dtype: torch.dtype
    dtype_name: str
    preset: str
    prompt: int
    new: int
    context: int
    compile: bool
    profile: bool
    peak_tflops: float = None
    model: object = None  # the fused bf16 model of the decode sections
    ids: object = None  # (1, prompt) random prompt ids
    bw: float = None  # GB/s, from the copy section
    base_tps: float = None  # decode tok/s of `model` (compiled when compiling): the quantized rows' reference
    base_ids: list = None  # its 128 greedy ids

    def release(self):
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def step(self):
        return compiled_decode_step(self.device.type) if self.compile else decode_step

    def prompt_ids(self):
        if self.ids is None:
            g = torch.Generator().manual_seed(1)
            self.ids = torch.randint(3, self.model.config.text_config.vocab_size, (1, self.prompt), generator=g)
            self.ids = self.ids.to(self.device)
        return self.ids

    def bandwidth(self):
        if self.bw is None:
            self.bw = copy_bandwidth(self.device, 1024 if self.device.type == "cuda" else 64)
        return self.bw


def timed(fn, device, repeats=3, warm=True):
    """Median seconds of `repeats` calls (after one warm-up call when warm), and the last result."""
    out = fn() if warm else None
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def copy_bandwidth(device, mib):
    """GB/s of a device-to-device copy (read + write), the HBM's usable bandwidth."""
    x = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t, _ = timed(lambda: y.copy_(x), device, repeats=10)
    return 2 * x.numel() / t / 1e9


@torch.inference_mode()
def run_decode(model, ids, new, step):
    """`new` greedy ids after ids (the caches set up inside inference mode, as owl.generate does)."""
    llm = model.language_model
    llm.setup_caches(ids.shape[0], ids.shape[1] + new)
    try:
        return generate_tokens(model, ids, max_new_tokens=new, eos_id=-1, decode=step)
    finally:
        llm.reset_caches()


def decode_speed(ctx, model, step, new=None, repeats=3):
    """(tok/s of the decode steps alone, (t(new) - t(1)) / (new - 1); the ids; the first call's extra
    seconds over a steady one: its compile)."""
    ids, new = ctx.prompt_ids(), new or ctx.new
    sync(ctx.device)
    t = time.perf_counter()
    out = run_decode(model, ids, new, step)
    sync(ctx.device)
    first = time.perf_counter() - t
    t_all, _ = timed(lambda: run_decode(model, ids, new, step), ctx.device, repeats, warm=False)
    t_one, _ = timed(lambda: run_decode(model, ids, 1, step), ctx.device, repeats)
    return (new - 1) / (t_all - t_one), out[0], first - t_all


@torch.inference_mode()
def step_alone(ctx, model, step, n):
    """Seconds per call of the decode step, n calls back to back (no generate loop, no host reads)."""
    llm, ids = model.language_model, ctx.prompt_ids()
    llm.setup_caches(1, ids.shape[1] + ctx.new)
    try:
        token = prefill(model, ids).argmax(-1)
        pos = torch.tensor([ids.shape[1]], device=ctx.device)

        def run():  # outputs dropped at once: a CUDA graph's output is overwritten by its next replay
            for _ in range(n):
                step(model, token, pos, None, None, None, temperature=0.0, top_k=0, top_p=1.0)
        t, _ = timed(run, ctx.device, repeats=3)
        profile(ctx, f"{n} decode steps alone, {describe(model)}", lambda: run())
        return t / n
    finally:
        llm.reset_caches()


def describe(model):
    kinds = {type(m).__name__ for m in model.language_model.modules()} & {"Int8Linear", "Int4Linear"}
    return ", ".join(sorted(kinds)) or str(model.language_model.lm_head.weight.dtype).replace("torch.", "")


def bound(ctx, llm):
    """(bytes a decode step reads: every weight but the embedding table, one row of it, and the whole
    static KV cache; the tok/s that reading them at the copy bandwidth allows)."""
    c = llm.config
    L = cache_length(ctx.prompt + ctx.new, c.max_position_embeddings)
    kv = 2 * c.num_hidden_layers * L * c.num_key_value_heads * c.head_dim * llm.model.embed_tokens.weight.element_size()
    need = bench_run.bytes_per_token(llm) + kv
    return need, ctx.bandwidth() * 1e9 / need


def profile(ctx, title, fn, rows=12):
    """torch.profiler's top kernels (CUDA) or operators (CPU) by self time, kept for the end."""
    if not ctx.profile:
        return
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    cuda = ctx.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        sync(ctx.device)
    key = (lambda e: getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) if cuda \
        else (lambda e: e.self_cpu_time_total)
    events = [e for e in prof.key_averages() if key(e) > 0 and (not cuda or e.device_type == DeviceType.CUDA)]
    events.sort(key=key, reverse=True)
    total = sum(key(e) for e in events) or 1
    lines = [f"  {'kernel' if cuda else 'operator':<72} {'calls':>6} {'ms':>9} {'%':>5}"]
    lines += [f"  {e.key[:72]:<72} {e.count:>6} {key(e) / 1e3:9.3f} {100 * key(e) / total:5.1f}" for e in events[:rows]]
    lines.append(f"  total {total / 1e3:.3f} ms {'on the device' if cuda else 'of CPU operators'}, "
                 f"{sum(e.count for e in events)} {'kernels' if cuda else 'operator calls'}")
    ctx.tab.add_profile(title, "\n".join(lines))


# ----------------------------------------------------------------------------- sections

def section_copy(ctx):
    ctx.bw = copy_bandwidth(ctx.device, 1024 if ctx.device.type == "cuda" else 64)
    ctx.tab.add("device-to-device copy (GB/s)", f"{ctx.bw:.0f}", "read + write of 1 GiB" if ctx.device.type == "cuda"
                else "64 MiB")


def section_chat(ctx):
    what = f"peak memory, chat at {ctx.context} tokens (GB)"
    if ctx.device.type != "cuda":
        return ctx.tab.add(what, "-", "CUDA only (tests/test_memory.py on CPU)")
    _, gb, _, _ = bench_run.chat_memory_row(ctx.model, ctx.device, ctx.context)
    est = estimate(ctx.model.config, "chat", dtype=ctx.dtype_name, context=ctx.context)["total"] / 2 ** 30
    ctx.tab.add(what, f"{gb:.2f}", f"owl.memory {est:.2f} GB ({est / gb - 1:+.1%}; target within 5%); fused projections")


def section_decode(ctx):
    model, kind = ctx.model, "compiled" if ctx.compile else "eager"
    eager_ids = run_decode(model, ctx.prompt_ids(), ctx.new, decode_step)[0] if ctx.compile else None
    tps, ids, compile_s = decode_speed(ctx, model, ctx.step())
    need, top = bound(ctx, model.language_model)
    note = f"{tps / top:.0%} of the bound ({top:.0f} tok/s at {ctx.bw:.0f} GB/s, {need / 1e6:.0f} MB/token); target >= 75%"
    if ctx.compile:
        skips = dict(torch._dynamo.utils.counters["inductor"]).get("cudagraph_skips", 0)
        note += f"; compile {compile_s:.0f} s; same ids as eager: {ids == eager_ids}; cudagraph skips: {skips}"
    ctx.tab.add(f"decode b=1 {kind}, fused, {ctx.prompt} + {ctx.new} tok (tok/s)", f"{tps:.1f}", note)
    ctx.base_tps, ctx.base_ids = tps, ids
    dt = step_alone(ctx, model, ctx.step(), 64 if ctx.device.type == "cuda" else 8)
    ctx.tab.add(f"decode step alone, {kind} (tok/s)", f"{1 / dt:.1f}", f"{1 / dt / top:.0%} of the bound; the "
                f"generate loop keeps {tps * dt:.0%} of it ({1e3 * (1 / tps - dt):.2f} ms/token outside the step)")


def ttft_inputs(ctx, tok):
    """A 640 x 480 noise image and a prompt with one <image> and about ctx.prompt text tokens."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    question = "Describe this image in detail."
    while len(tok.encode_prompt(owl.build_prompt([(1, question, None)]))) - tok.image_tokens < ctx.prompt:
        question += " Say what is where, its colours and shapes."
    prompt = owl.build_prompt([(1, question, None)])
    return image, prompt, len(tok.encode_prompt(prompt)) - tok.image_tokens


@torch.inference_mode()
def prefill_once(model, ids, embeds, pf):
    model.language_model.setup_caches(1, ids.shape[1] + 1)
    try:
        return pf(model, ids, embeds).argmax(-1)
    finally:
        model.language_model.reset_caches()


def section_ttft(ctx):
    model, dev = ctx.model, ctx.device
    tok = owl.Tokenizer(os.path.join(ROOT, "tests", "fixtures", "reference", "tokenizer.model"), model.config.image_tokens)
    image, prompt, n_text = ttft_inputs(ctx, tok)
    eager = lambda: generate(model, tok, prompt, [image], max_new_tokens=1)
    ms_eager, want = timed(eager, dev, repeats=5)
    what = f"first token, 1 image + {n_text} tok"
    if not ctx.compile:
        profile(ctx, "first token, eager", eager)
        return ctx.tab.add(f"{what}, eager (ms)", f"{1e3 * ms_eager:.1f}", "target <= 20 ms compiled")
    fast = lambda: generate(model, tok, prompt, [image], max_new_tokens=1, compile_prefill=True)
    sync(dev)
    t = time.perf_counter()
    fast()
    first = time.perf_counter() - t
    ms, got = timed(fast, dev, repeats=10)
    size = model.config.vision_config.image_size
    t_pre, px = timed(lambda: torch.stack([owl.preprocess_image(image, size)]).to(dev), dev, repeats=5)
    t_vit, embeds = timed(lambda: compiled_encode(dev.type)(model, px), dev, repeats=5)
    ids = torch.tensor([tok.encode_prompt(prompt)], device=dev)
    t_pf, _ = timed(lambda: prefill_once(model, ids, embeds, compiled_prefill(dev.type)), dev, repeats=5)
    t_vit_e, _ = timed(lambda: encode_images(model, px), dev, repeats=3)
    t_pf_e, _ = timed(lambda: prefill_once(model, ids, embeds, prefill), dev, repeats=3)
    ctx.tab.add(f"{what}, compiled (ms)", f"{1e3 * ms:.1f}",
                f"target <= 20; compile {first - ms:.0f} s; preprocess {1e3 * t_pre:.1f} + ViT/abstractor "
                f"{1e3 * t_vit:.1f} + prefill {1e3 * t_pf:.1f} ms (each alone, synced; eager {1e3 * t_vit_e:.1f} and "
                f"{1e3 * t_pf_e:.1f}); eager end to end {1e3 * ms_eager:.1f} ms; same token: {got == want}")
    profile(ctx, "first token, compile_prefill=True", fast)


def int_kernel_error(ctx, q, kind, group):
    """The quantized qkv projection of layer 0 against the weight it stands for (its dequantization):
    relative error of one row's output (bf16 rounding, ~1e-2, when the packing is right; ~1 when not)."""
    lin = q.language_model.model.layers[0].self_attn.qkv_proj
    w = ctx.model.language_model.model.layers[0].self_attn.qkv_proj.weight
    if kind == "int8":
        deq = lin.weight.float() * lin.scales.float()[:, None]
    else:
        deq = int4_dequantize(*quantize_weight_int4(w, group))
    x = torch.randn(1, w.shape[1], device=ctx.device, dtype=w.dtype)
    with torch.inference_mode():
        y, ref = lin(x).float(), F.linear(x.float(), deq)
    return float((y - ref).norm() / ref.norm())


@torch.inference_mode()
def teacher_forced(ctx, q):
    """Agreement of q's greedy argmax with the base model's on the base model's own continuation,
    max |logit difference| and the logits' spread."""
    full = torch.cat([ctx.prompt_ids(), torch.tensor([ctx.base_ids[:-1]], device=ctx.device)], dim=1)
    a = ctx.model.language_model(full)[0, ctx.prompt - 1:].float()
    b = q.language_model(full)[0, ctx.prompt - 1:].float()
    return float((a.argmax(-1) == b.argmax(-1)).float().mean()), float((a - b).abs().max()), float(a.std())


def section_int(ctx, kind):
    c = ctx.model.config.text_config
    group = 128 if c.hidden_size % 128 == 0 and c.intermediate_size % 128 == 0 else 32
    if ctx.base_tps is None:
        section_decode(ctx)
    q = quantize(copy.deepcopy(ctx.model), kind, group_size=group)
    err = int_kernel_error(ctx, q, kind, group)
    tps, _, compile_s = decode_speed(ctx, q, ctx.step())
    need, top = bound(ctx, q.language_model)
    agree, diff, std = teacher_forced(ctx, q)
    target = {"int8": 1.5, "int4": 2.0}[kind]
    est = estimate(q.config, "chat", dtype=ctx.dtype_name, quantize=kind, group_size=group)["weights"] / 2 ** 30
    ctx.tab.add(f"decode b=1 {kind}{f' g{group}' if kind == 'int4' else ''}{', compiled' if ctx.compile else ''} (tok/s)",
                f"{tps:.1f}", f"{tps / ctx.base_tps:.2f}x {ctx.dtype_name} (target >= {target}x); {tps / top:.0%} of its "
                f"bound ({top:.0f} tok/s, {need / 1e6:.0f} MB/token)" + (f"; compile {compile_s:.0f} s" if ctx.compile else "")
                + f"; kernel vs its dequantized weight: rel err {err:.1e}; teacher-forced agreement with "
                f"{ctx.dtype_name} {agree:.0%}, max |logit diff| {diff:.2f} (logit std {std:.2f}; random weights); "
                f"weights {weight_bytes(q) / 2 ** 30:.2f} GB (owl.memory {est:.2f})")
    step_alone(ctx, q, ctx.step(), 8)  # its profile
    del q


def section_int8(ctx):
    section_int(ctx, "int8")


def section_int4(ctx):
    section_int(ctx, "int4")


def section_gemv(ctx):
    """One projection's matmul at one row: bytes of its weight / time (do_bench: CUDA events, L2 flushed)."""
    if ctx.device.type != "cuda":
        return ctx.tab.add("one-row matmul alone (GB/s)", "-", "CUDA only")
    from triton.testing import do_bench
    c, dev = owl.preset(ctx.preset).text_config, ctx.device
    for name, (n, k) in {"qkv": (3 * c.hidden_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size)}.items():
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        got = {}
        with torch.inference_mode():
            for kind, m, compiled in (("cuBLAS", lin, False), ("inductor", lin, True),
                                      ("int8", Int8Linear.from_linear(lin), True), ("int4", Int4Linear.from_linear(lin), False)):
                fn = torch.compile(m, options={"coordinate_descent_tuning": True}) if compiled else m
                fn(x)
                ms = do_bench(lambda: fn(x), return_mode="median")
                got[kind] = weight_bytes(m) / ms / 1e6
        ctx.tab.add(f"one-row matmul alone, {name} {n} x {k} (GB/s)", f"{got['cuBLAS']:.0f}",
                    f"cuBLAS; inductor reduction {got['inductor']:.0f}, int8 {got['int8']:.0f}, int4 {got['int4']:.0f} "
                    f"(weight bytes / time; copy {ctx.bandwidth():.0f})")


def section_eager(ctx):
    new = min(ctx.new, 32)
    tps, ids, _ = decode_speed(ctx, ctx.model, decode_step, new=new, repeats=2)
    ctx.tab.add(f"decode b=1 eager, fused, {new} tok (tok/s)", f"{tps:.1f}",
                f"the compiled step: {ctx.base_tps / tps:.1f}x" if ctx.base_tps and ctx.compile else "")
    if transformers is None:
        return ctx.tab.add("decode b=1 HF eager (tok/s)", "-", "transformers not installed (bench/requirements.txt)")
    hf = hf_twin(ctx.model.language_model, ctx.device)
    ids = ctx.prompt_ids()

    def hf_generate(n):
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=n, do_sample=False)
    t_all, _ = timed(lambda: hf_generate(new), ctx.device, repeats=2)
    t_one, _ = timed(lambda: hf_generate(1), ctx.device, repeats=2)
    hf_tps = (new - 1) / (t_all - t_one)
    ctx.tab.add("decode b=1 HF eager (tok/s)", f"{hf_tps:.1f}", f"owl eager / HF {tps / hf_tps:.2f}x" +
                (f"; owl compiled / HF {ctx.base_tps / hf_tps:.1f}x" if ctx.base_tps and ctx.compile else ""))
