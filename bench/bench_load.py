"""Peak resident memory while loading a ~1 GB checkpoint, as a multiple of the checkpoint's size.

    python bench/bench_load.py [--gb 1.0] [--dtype bf16|fp32]

Writes a random mPLUG-Owl-shaped checkpoint (official layout) to a temporary directory, then loads it
with owl.load_model(dtype=None) in a fresh process and reports (peak RSS - RSS after imports) /
file size. Loading builds the model on the meta device and assigns the tensors it reads, so the
target is <= 1.2x (the weights are never held twice).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import resource, sys, time, torch
sys.path.insert(0, {root!r})
import owl
def rss_mb():  # current resident set, from /proc
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
base = rss_mb()
t = time.time()
model, tok = owl.load_model({path!r}, dtype=None)
dt = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(base, peak, n, dt)
"""


def write_checkpoint(path, gb, dtype):
    import torch
    import owl
    cfg = owl.preset("owl-7b")  # ViT-L/14 + the abstractor + a LLaMA of half 7B's width ...
    t = cfg.text_config
    t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads = 2048, 5504, 16, 16
    bytes_per = 2 if dtype == "bf16" else 4

    def size(layers):
        t.num_hidden_layers = layers
        with torch.device("meta"):
            return sum(p.numel() for p in owl.MplugOwl(cfg).parameters()) * bytes_per
    layers = 1  # ... and as many layers as bring the checkpoint to about `gb` gigabytes
    while size(layers + 1) <= gb * 2**30:
        layers += 1
    t.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device("meta"):
        m = owl.MplugOwl(cfg)
    m = m.to_empty(device="cpu").to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.02)
    owl.save_model(m, path, tokenizer_file=os.path.join(ROOT, "tests/fixtures/reference/tokenizer.model"))
    del m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ck")
        write_checkpoint(path, args.gb, args.dtype)
        size = os.path.getsize(os.path.join(path, "model.safetensors")) / 2**20
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, path=path)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr.strip().splitlines()[-1])
        out = out.stdout.split()
        base, peak, params, dt = map(float, out)
        print(json.dumps({"checkpoint_mb": round(size), "params_mb": round(params), "rss_after_imports_mb": round(base),
                          "peak_rss_mb": round(peak), "load_s": round(dt, 2),
                          "ratio": round((peak - base) / size, 3)}))


if __name__ == "__main__":
    main()
