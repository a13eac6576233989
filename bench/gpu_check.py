"""One GPU check, one table (bench/gpu_check.sh runs it; <= 8 minutes on one H100-class GPU, compiles
included: --budget, in seconds, skips what would not fit).

  python bench/gpu_check.py                                    # CUDA, 7B shapes, bf16, random weights
  python bench/gpu_check.py --sections decode,ttft,int4        # some sections, in this order
  python bench/gpu_check.py --device cpu --shape tiny --dtype fp32 --no-tests --no-compile   # the smoke run (a test)

Every row is printed and flushed the moment it is measured, and appended to $OUT/gpu_check.md when
OUT is set (or --out), so a run its time limit cuts keeps what it measured; a section that fails
prints its error as its row and the run goes on. Sections, most telling first (SECTIONS):
  copy      device-to-device copy: the usable HBM bandwidth, the decode bound's denominator
  chat      peak memory of a 2k-token chat with one image, next to owl.memory's estimate
  decode    7B decode at batch 1, fused projections, compiled (CUDA graphs, sampling in the step, the
            host a step behind): tok/s and % of the bound, its compile time; the compiled step alone
  ttft      first token for one image + ~64 text tokens through owl.generate (PIL image in), eager and
            compile_prefill=True, with the compiled path's breakdown (preprocess, ViT + abstractor, prefill)
  train1/2  a training step of stage 1 and 2 as train.py would run it: --grad-checkpointing auto (the
            rule's line), regional compilation (owl.model.compile_blocks), fused AdamW; tok/s, MFU
            (FlopCounterMode FLOPs / the card's dense bf16 peak), peak memory next to owl.memory's
  int4/int8 weight-only decode, compiled (owl.quant.quantize): tok/s against bf16's, the kernel against
            its dequantized weight, teacher-forced agreement with bf16
  gemv      one projection's matmul alone (cuBLAS, inductor's reduction, int8, int4): GB/s
  eager     eager decode, and HF transformers' generate on the same tensors when installed
  ddp       one train_step through DistributedDataParallel in a one-process group
  suite     tests/test_device.py and tests/test_device_fast.py with OWL_TEST_DEVICE=cuda
At the end, the profile: torch.profiler's top kernels of a few decode steps (bf16, int8, int4) and of
one first token, measured as their sections ran (--no-profile skips). Nothing is downloaded.
"""
import argparse
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import owl  # noqa: E402
import gpu_rows  # noqa: E402
import gpu_train_rows  # noqa: E402
from harness import build, sync  # noqa: E402

# Dense bf16 tensor-core peaks (spec sheets), for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 756.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}
SIZES = {  # shape: (config, prompt, new tokens, chat context, (stage-1 batch, tokens), (stage-2 batch, tokens))
    "7b": ("owl-7b", 64, 128, 2048, (16, 128), (4, 2048)),
    "tiny": ("tiny", 16, 8, 256, (1, 96), (1, 128)),
}
SECTIONS = ("copy", "chat", "decode", "ttft", "train1", "int4", "int8", "train2", "gemv", "eager", "ddp", "suite")
COST_S = {"copy": 5, "chat": 15, "decode": 80, "ttft": 70, "train1": 90, "int4": 60, "int8": 60, "train2": 90,
          "gemv": 30, "eager": 30, "ddp": 10, "suite": 60}  # rough seconds on an H200, compiles included (guesses)


class Table:
    """Rows printed and flushed as measured (and appended to OUT/gpu_check.md); the time budget."""

    def __init__(self, out_dir, budget):
        self.lines, self.t0, self.budget, self.profiles = [], time.time(), budget, []
        self.file = os.path.join(out_dir, "gpu_check.md") if out_dir else None
        if self.file:
            os.makedirs(out_dir, exist_ok=True)

    def write(self, line):
        print(line, flush=True)
        self.lines.append(line)
        if self.file:
            with open(self.file, "a") as f:
                f.write(line + "\n")

    def add(self, what, value, note=""):
        self.write(f"| {what:<46} | {value:>10} | {note}")

    def add_profile(self, title, text):
        """A profile table: printed at the end; in OUT/gpu_profile.txt at once."""
        self.profiles.append((title, text))
        if self.file:
            with open(os.path.join(os.path.dirname(self.file), "gpu_profile.txt"), "a") as f:
                f.write(f"{title}\n{text}\n\n")

    def left(self):
        return self.budget - (time.time() - self.t0)

    def run(self, name, fn, device):
        """Run one section unless the budget cannot hold it; its error becomes its row."""
        if self.left() < COST_S.get(name, 30):
            self.add(name, "skipped", f"needs ~{COST_S.get(name, 30)} s; {self.left():.0f} s left of --budget")
            return
        t = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (one broken section must not cost the others)
            traceback.print_exc()
            self.add(name, "FAILED", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  ({name}: {time.time() - t:.0f} s; {time.time() - self.t0:.0f} s in all)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="7b", choices=SIZES)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: from its name)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, in order (default: {','.join(SECTIONS)})")
    p.add_argument("--budget", type=float, default=520, help="seconds; a section that would not fit is skipped "
                   "(gpu_check.sh's timeout is 570)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.md (default: $OUT)")
    p.add_argument("--no-tests", action="store_true", help="skip the suite section")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager everywhere (the smoke run)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="no torch.profiler tables")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is visible (--device cpu --shape tiny for the smoke run)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    sections = [s for s in a.sections.split(",") if s and not (s == "suite" and a.no_tests)]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    preset, prompt, new, context, s1, s2 = SIZES[a.shape]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    tab = Table(a.out, a.budget)
    tab.write(f"owl GPU check: {name}, torch {torch.__version__}, {preset} shapes, {a.dtype}, random weights, "
              f"sections {','.join(sections)}")
    tab.write(f"| {'what':<46} | {'value':>10} | notes\n|{'-' * 48}|{'-' * 12}|------")
    ctx = gpu_rows.Context(tab=tab, device=device, dtype=dtype, dtype_name=a.dtype, preset=preset, prompt=prompt,
                           new=new, context=context, compile=a.compile, profile=a.profile, peak_tflops=peak)
    torch.manual_seed(0)
    for s in sections:
        if s in ("chat", "decode", "ttft", "int4", "int8", "eager") and ctx.model is None:
            t = time.time()
            ctx.model = owl.llama.fuse_projections(build(owl.preset(preset), device, dtype))
            sync(device)
            print(f"  (built and fused the {preset} model in {time.time() - t:.0f} s)", flush=True)
        if s in ("train1", "train2", "ddp", "suite") and ctx.model is not None:
            ctx.release()  # training and the suite want the memory
        kw = {"train1": {"sizes": s1}, "train2": {"sizes": s2}}.get(s, {})
        section = getattr(gpu_rows, f"section_{s}", None) or getattr(gpu_train_rows, f"section_{s}")
        tab.run(s, lambda section=section, kw=kw: section(ctx, **kw), device)
    ctx.release()
    tab.write(f"\nowl GPU check done in {time.time() - tab.t0:.0f} s: {name}, torch {torch.__version__}")
    for line in tab.lines[1:]:
        if line.startswith("|"):
            print(line)
    if a.profile and tab.profiles:
        print("\nprofile: top kernels by device time (torch.profiler), measured in the sections above")
        for title, text in tab.profiles:
            print(f"\n{title}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
