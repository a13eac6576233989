"""Speed and memory of owl, side by side with HF transformers. A benchmark, not a test.

  python bench/run.py                                  # CPU, fp32, 2 threads (1 when busy), 57M LLaMA (< 5 min)
  python bench/run.py --device cuda --dtype bf16 --shape 7b                # a GPU, 7B-shaped weights

Random weights (no checkpoint needed). The same tensors serve both libraries: the HF model is built on
the meta device and takes owl's state dict with assign=True (the parameter names are the same), so
both read the same bytes. Every row runs its contenders interleaved, in a rotating order, `--repeats`
times, and reports medians: the CPU is shared, so a single timing means little. HF rows appear where
`transformers` is importable (bench/requirements.txt); training rows call bench/bench_train.py.
"""
import argparse
import copy
import functools
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import owl  # noqa: E402
from owl.generate import compiled_decode_step, decode_one_token, generate_tokens, prefill  # noqa: E402
from owl.llama import fuse_projections  # noqa: E402
from owl.quant import quantize, weight_bytes  # noqa: E402
from tests.test_decode_fast import old_generate_tokens  # noqa: E402  (main's loop before issue 23, kept as a test)
from harness import (bandwidth_gbs, build, hf_twin, paired, print_table, race, set_threads,  # noqa: E402
                     transformers)

SHAPES = {"57m": owl.preset("57m"), "7b": owl.preset("owl-7b")}  # the ViT + abstractor matter for the first token
PROMPT, NEW, BATCH = 64, 128, 8


@torch.inference_mode()
def owl_decode(model, ids, pad_mask=None, decode=None, loop=generate_tokens):  # ids (B, T)
    B, T = ids.shape
    model.language_model.setup_caches(B, T + NEW)
    try:
        return loop(model, ids, max_new_tokens=NEW, pad_mask=pad_mask, eos_id=-1,
                    **({} if decode is None else {"decode": decode}))
    finally:
        model.language_model.reset_caches()


@functools.lru_cache(maxsize=None)
def old_compiled_step():
    """The compiled step before issue 23 (decode_one_token: logits out, sampling outside), on the CPU."""
    return torch.compile(decode_one_token, fullgraph=True)


@torch.inference_mode()
def hf_decode(hf, ids, attention_mask=None):
    out = hf.generate(ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False)
    assert out.shape[1] == ids.shape[1] + NEW
    return out[:, ids.shape[1]:].tolist()


@torch.inference_mode()
def ttft_owl(model, ids, px):  # one image + the text: encode, prefill, pick the first token
    llm = model.language_model
    llm.setup_caches(1, ids.shape[1] + 1, dtype=llm.model.embed_tokens.weight.dtype)
    try:
        return prefill(model, ids, model.encode_images(px)).argmax(-1)
    finally:
        llm.reset_caches()


@torch.inference_mode()
def ttft_hf(model, hf, ids, px):  # the same image encoder (HF has no mPLUG-Owl), then HF's LLaMA
    x = model.embed(ids, model.encode_images(px))
    return hf(inputs_embeds=x, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)


def bytes_per_token(llm):
    """What one decode step must read: every weight but the embedding table (one row of it)."""
    emb = llm.model.embed_tokens.weight
    return weight_bytes(llm) - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


@torch.inference_mode()
def int8_quality(model, q, ids, ref_ids):
    """Max |logit difference| over the prompt, and teacher-forced / free-running greedy agreement."""
    full = torch.cat([ids, torch.tensor([ref_ids[:-1]], device=ids.device)], dim=1)
    a, b = model.language_model(full).float(), q.language_model(full).float()  # (1, T + NEW - 1, vocab)
    tf = float((a[0, PROMPT - 1:].argmax(-1) == b[0, PROMPT - 1:].argmax(-1)).float().mean())
    free = owl_decode(q, ids)[0]
    return float((a - b).abs().max()), float(a.std()), tf, sum(x == y for x, y in zip(free, ref_ids)) / len(ref_ids)


def fixture_quality(kind, lm_head):
    """The same numbers on the tiny reference checkpoint's four cases (as tests/test_quant4.py asserts)."""
    ref = os.path.join(ROOT, "tests", "fixtures", "reference")
    model, tok = owl.load_model(os.path.join(ref, "mplug_owl"))
    q = quantize(copy.deepcopy(model), kind, group_size=32, lm_head=lm_head)
    with open(os.path.join(ref, "cases.json")) as f:
        cases = json.load(f)
    diff, agree = 0.0, 0
    for c in cases:
        ims = [owl.load_image(os.path.join(ref, p)) for p in c["images"]]
        px = torch.stack([owl.preprocess_image(im, 56) for im in ims]) if ims else None
        full = torch.tensor([c["input_ids"] + c["generated_ids"][:-1]])
        with torch.no_grad():
            diff = max(diff, float((model(full, pixel_values=px) - q(full, pixel_values=px)).abs().max()))
        got = owl.generate(q, tok, c["prompt"], ims, max_new_tokens=16)
        agree += sum(x == y for x, y in zip(got, c["generated_ids"]))
    return diff, agree / (16 * len(cases))


@torch.inference_mode()
def chat_memory_row(model, device, context=2048):
    """GPU: peak memory of a chat at full context: one image + text filling `context`, then 16 tokens."""
    torch.cuda.reset_peak_memory_stats(device)
    n = model.config.image_tokens
    ids = torch.randint(3, 1000, (1, context - 16), device=device)
    ids[:, 1:1 + n] = -1
    px = torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size,
                     device=device, dtype=model.query_tokens.dtype)
    model.language_model.setup_caches(1, context)
    try:
        generate_tokens(model, ids, model.encode_images(px), max_new_tokens=16, eos_id=-1)
    finally:
        model.language_model.reset_caches()
    gb = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return (f"peak memory, chat with 1 image at {context} tokens (GiB)", gb, None, "weights + KV cache + activations")


def train_rows(device, threads):
    """bench/bench_train.py's stage-1 and stage-2 steps, each in a fresh process (clean peak memory)."""
    if not os.path.exists(os.path.join(ROOT, "bench", "bench_train.py")):
        return [("training", "bench/bench_train.py is missing")]
    code = ("import json, sys, torch; sys.path.insert(0, 'bench'); torch.set_num_threads({t}); import bench_train as b; "
            "print(json.dumps(b.bench('{p}', {s}, 4, {T}, 3, torch.device('{d}'), '{prec}')))")
    preset, prec = ("tiny", "fp32") if device.type == "cpu" else ("owl-7b", "bf16")
    rows = []
    for stage, T in ((1, 128), (2, 512 if device.type == "cpu" else 2048)):
        run = subprocess.run([sys.executable, "-c", code.format(t=threads, p=preset, s=stage, T=T,
                                                                 d=device.type, prec=prec)],
                             cwd=ROOT, capture_output=True, text=True)
        if run.returncode:
            rows.append((f"train stage {stage}", "failed: " + (run.stderr.strip().splitlines() or ["?"])[-1]))
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append((f"train stage {stage} ({preset}, {prec}, 4 x {T} tok)", f"{r['tok_per_s']:.0f} tok/s, peak mem "
                     f"{r['peak_mem_gb']:.2f} GB, {r['trainable']:,} trainable; {threads} thr"))
    return rows


def decode_rows(model, fused, hf, ids, compile, device, dtype, repeats):
    """Batch-1 decode: owl (the loop of issue 23 on fused projections), `old` (the loop it replaced,
    main before issue 23, on the unfused model: the regression check, in the same race), int8, int8 +
    lm_head, int4, compiled (new and old) and HF; the bandwidth bound; the quantized models' quality."""
    shape, c = model.config, model.config.text_config
    group = 128 if c.hidden_size % 128 == 0 and c.intermediate_size % 128 == 0 else 32
    qs = {"int8": quantize(build(shape, device, dtype), "int8"), "int8+head": quantize(build(shape, device, dtype),
          "int8", lm_head=True), "int4": quantize(build(shape, device, dtype), "int4", group_size=group)}
    fns = {"owl": lambda: owl_decode(fused, ids), "old": lambda: owl_decode(model, ids, loop=old_generate_tokens)}
    fns.update({k: (lambda q=q: owl_decode(q, ids)) for k, q in qs.items()})
    if compile:  # the first calls compile (20-60 s each on the CPU); race() warms up with them
        fns["compiled"] = lambda: owl_decode(fused, ids, decode=compiled_decode_step(device.type))
        fns["old compiled"] = lambda: owl_decode(model, ids, decode=old_compiled_step(), loop=old_generate_tokens)
    if hf is not None:
        fns["hf"] = lambda: hf_decode(hf, ids)
    t, res = race(fns, repeats, device)
    tps = {n: NEW / t[n] for n in t}
    note = "" if hf is None else f"same ids as HF: {res['owl'] == res['hf']}; paired ratio {paired('owl', 'hf'):.2f}x"
    rows = [(f"decode b=1, {PROMPT} + {NEW} tok (tok/s)", tps["owl"], tps.get("hf"), note),
            ("  the loop before issue 23, unfused (tok/s)", tps["old"], tps.get("hf"),
             f"new / old: {tps['owl'] / tps['old']:.2f}x (paired {paired('owl', 'old'):.2f}x); "
             f"same ids: {res['owl'] == res['old']}")]
    if compile:
        rows.append(("  owl compiled, static cache (tok/s)", tps["compiled"], tps.get("hf"),
                     f"{tps['compiled'] / tps['owl']:.2f}x eager (paired {paired('compiled', 'owl'):.2f}x); "
                     f"same ids: {res['compiled'] == res['owl']}"))
        rows.append(("  compiled, the loop before issue 23 (tok/s)", tps["old compiled"], tps.get("hf"),
                     f"new / old: {tps['compiled'] / tps['old compiled']:.2f}x (paired "
                     f"{paired('compiled', 'old compiled'):.2f}x); same ids: {res['old compiled'] == res['owl']}"))
    bw = bandwidth_gbs(device)
    for name, m in (("owl", fused), *qs.items()):
        need = bytes_per_token(m.language_model)
        rows.append((f"  {name}: {need / 1e6:.0f} MB/token, bound at {bw:.1f} GB/s", bw * 1e9 / need, None,
                     f"reached {tps[name] * need / bw / 1e9:.0%} ({tps[name]:.1f} tok/s)"))
    for name, m in qs.items():
        diff, std, tf, free = int8_quality(fused, m, ids, res["owl"][0])
        fdiff, fagree = fixture_quality(name[:4], lm_head=name == "int8+head")
        rows.append((f"  {name}{f' g{group}' if name == 'int4' else ''}: weights {weight_bytes(m.language_model) / 1e6:.0f}"
                     f" MB (fp {weight_bytes(model.language_model) / 1e6:.0f})", tps[name], None,
                     f"{tps[name] / tps['owl']:.2f}x fp; max logit diff {diff:.3f} (logit std {std:.3f}), greedy "
                     f"agree {tf:.0%} teacher-forced, {free:.0%} free; fixtures (g32): diff {fdiff:.3f}, agree {fagree:.0%}"))
    return rows


def overhead_row(ids, device, dtype, repeats):
    """The decode race on the tiny preset's LLM, where reading the weights costs next to nothing."""
    tiny = build(owl.preset("tiny"), device, dtype)
    tiny_hf = hf_twin(tiny.language_model, device)
    ids = ids.clamp(max=tiny.config.text_config.vocab_size - 1)
    t, _ = race({"owl": lambda: owl_decode(tiny, ids), "hf": lambda: hf_decode(tiny_hf, ids)}, repeats, device)
    return ("  overhead: tiny LLM, 96 wide, 2 layers (ms/tok)", 1e3 * t["owl"] / NEW, 1e3 * t["hf"] / NEW,
            f"paired ratio {paired('owl', 'hf'):.2f}x; Python + small ops")


def ttft_row(model, hf, ids, device, dtype, repeats):
    """Time to first token for one image + the 64 text tokens."""
    n_img, size = model.config.image_tokens, model.config.vision_config.image_size
    img_ids = torch.cat([ids[:, :1], torch.full((1, n_img), -1, device=device), ids[:, 1:]], dim=1)  # (1, 65 + 64)
    px = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    fns = {"owl": lambda: ttft_owl(model, img_ids, px)}
    if hf is not None:
        fns["hf"] = lambda: ttft_hf(model, hf, img_ids, px)
    t, _ = race(fns, repeats, device)
    return (f"first token, image + {PROMPT} tok (ms)", 1e3 * t["owl"], 1e3 * t["hf"] if hf else None,
            "lower is better; HF: our ViT + abstractor, then HF LLaMA")


def batch_row(model, hf, device, repeats):
    """Batched generation: BATCH prompts of 40..64 tokens, left padding, NEW tokens each."""
    g = torch.Generator().manual_seed(3)
    lens = torch.linspace(40, PROMPT, BATCH).long()  # (8,)
    mask = (torch.arange(PROMPT)[None, :] >= PROMPT - lens[:, None]).to(device)  # (8, 64), True = real token
    ids = torch.randint(3, model.config.text_config.vocab_size, (BATCH, PROMPT), generator=g).to(device)
    ids = ids.masked_fill(~mask, 0)
    fns = {"owl": lambda: owl_decode(model, ids, mask)}
    if hf is not None:
        fns["hf"] = lambda: hf_decode(hf, ids, mask.long())
    t, res = race(fns, repeats, device)
    note = "" if hf is None else f"same ids as HF: {res['owl'] == res['hf']}; paired ratio {paired('owl', 'hf'):.2f}x"
    return (f"batch {BATCH}, left-padded, {NEW} new (tok/s)", BATCH * NEW / t["owl"],
            BATCH * NEW / t["hf"] if hf else None, note)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="57m", choices=SHAPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads; default 0: 2, or 1 while other processes keep a core busy (checked per row)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the compiled decode row (torch.compile of the decode step: ~30 s to compile on a CPU)")
    p.add_argument("--no-train", action="store_true", help="skip the training rows")
    a = p.parse_args()
    device, dtype = torch.device(a.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is visible")
    if a.shape == "7b" and device.type == "cpu":
        sys.exit("error: --shape 7b needs --device cuda")
    t_start, load = time.time(), os.getloadavg()[0]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"owl vs HF transformers {transformers.__version__ if transformers else '(not installed)'}: {a.shape} shape, "
          f"{a.dtype}, {where}, torch {torch.__version__}, median of {a.repeats}; load average {load:.1f}")

    def threads_noted(make):  # each section re-checks the load (--threads 0) and notes its thread count
        n = set_threads(a.threads)
        made = make()
        return [(w, ours, theirs, f"{note}; {n} thr".lstrip("; ")) for w, ours, theirs, note in
                (made if isinstance(made, list) else [made])]

    set_threads(a.threads)
    model = build(SHAPES[a.shape], device, dtype)
    rows = []  # (what, owl, HF or None, note)
    if device.type == "cuda":
        rows.append(chat_memory_row(model, device))  # first: with no other model on the GPU
    hf = hf_twin(model.language_model, device) if transformers else None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.text_config.vocab_size, (1, PROMPT), generator=g).to(device)  # (1, 64)
    fused = fuse_projections(copy.deepcopy(model))  # the same weights, q/k/v and gate/up fused (inference)
    rows += threads_noted(lambda: decode_rows(model, fused, hf, ids, a.compile, device, dtype, a.repeats))
    if hf is not None and device.type == "cpu":
        rows += threads_noted(lambda: overhead_row(ids, device, dtype, a.repeats))
    rows += threads_noted(lambda: ttft_row(fused, hf, ids, device, dtype, 2 * a.repeats))
    rows += threads_noted(lambda: batch_row(fused, hf, device, max(2, a.repeats // 2)))

    del model, fused, hf  # the training rows run in fresh processes (owl only: HF has no mPLUG-Owl)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    train = [] if a.no_train else train_rows(device, set_threads(a.threads))
    print_table(rows, train)
    print(f"total {time.time() - t_start:.0f} s, load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
