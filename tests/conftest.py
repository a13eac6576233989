"""Shared by the tests: the repository root on sys.path, the reference fixtures, the loaded tiny
model, and one intra-op thread where a test file asks for it."""
import json
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REF = os.path.join(ROOT, "tests", "fixtures", "reference")  # a copy of shared/reference

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    # torch.compile's own internals call the deprecated torch.jit.script_method (torch 2.13): not ours
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def load_cases(ref=REF):
    """The reference generation cases (prompt, images, the official model's greedy ids, ...)."""
    with open(os.path.join(ref, "cases.json")) as f:
        return json.load(f)


def tiny_model(seed=0):
    """The tiny preset with random weights (no file read)."""
    import owl
    torch.manual_seed(seed)
    m = owl.MplugOwl(owl.preset("tiny"))
    m.init_weights()
    return m.eval()


def tiny_batch(seed=1):
    """Two rows of 90 ids with one image each (slots 5..69) and their pixels, for tiny_model."""
    from owl.tokenizer import IMAGE_SLOT
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (2, 90), generator=g)
    ids[:, 5:70] = IMAGE_SLOT
    px = torch.randn(2, 3, 56, 56, generator=g)
    return ids, px


def noise_images(folder, n=6):
    """n small PNGs of noise, 0.png .. (n-1).png, of different heights (the training tests' images)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30 + 4 * i, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a small shared CPU two OpenMP threads spin against other work and a
    tiny step can take 100x longer. Restored afterwards for the other tests."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def ref():
    return REF


@pytest.fixture(scope="session")
def expected():
    from safetensors.torch import load_file
    return load_file(os.path.join(REF, "expected.safetensors"))


@pytest.fixture(scope="session")
def owl_model():
    import owl
    return owl.load_model(os.path.join(REF, "mplug_owl"))


def run_script(capsys, path, *args):
    """`python path args` in this process: the script's own __main__ block runs (its one-line errors and
    exit codes included) without an interpreter start. (exit code, stdout, stderr)."""
    import runpy
    from types import SimpleNamespace
    old, sys.argv = sys.argv, [path, *map(str, args)]
    try:
        runpy.run_path(path, run_name="__main__")
        rc = 0
    except SystemExit as e:  # sys.exit("error: ...") prints the text and exits 1, as Python does
        rc = e.code if isinstance(e.code, int) or e.code is None else print(e.code, file=sys.stderr) or 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=rc or 0, stdout=out, stderr=err)


def call_main(capsys, main, *args):
    """A command's main(argv) in this process: (exit code, stdout, stderr), sys.exit("error: ...")
    counted as Python counts it (the text on stderr, exit code 1)."""
    from types import SimpleNamespace
    try:
        main([str(a) for a in args])
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out, stderr=err)


def one_line(r, *words):
    """The run failed with exactly one line on stderr (no traceback) holding every word."""
    lines = [l for l in r.stderr.replace("\r", "\n").splitlines()
             if l.strip() and not re.search(r"\| *\S+/\S+ \[\d+:\d\d", l)]  # (tqdm's progress bar is no error)
    assert r.returncode not in (0, None) and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr[-3000:]
    return lines[0]
