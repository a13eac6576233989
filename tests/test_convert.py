"""python -m owl.convert: released .bin shards -> safetensors, checked, never unpickling code."""
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

import owl
from tests.conftest import ROOT


def make_release(ref, d):
    """The reference checkpoint in the release's layout: two .bin shards + index + inv_freq buffers."""
    shutil.copytree(os.path.join(ref, "mplug_owl"), d)
    sd = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, os.path.join(d, name))
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    return sd


def run(*args):
    return subprocess.run([sys.executable, "-m", "owl.convert", *args], cwd=ROOT, capture_output=True, text=True)


def test_convert_round_trip(ref, tmp_path):
    src, dst = tmp_path / "release", tmp_path / "converted"
    sd = make_release(ref, str(src))
    r = run(str(src), str(dst))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(dst)) == ["config.json", "model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                       "preprocessor_config.json", "tokenizer.model"]
    model, _ = owl.load_model(str(dst))
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if "inv_freq" not in k)
    assert not any("inv_freq" in k for k in json.load(open(dst / "model.safetensors.index.json"))["weight_map"])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_convert_refuses_pickled_code(ref, tmp_path):
    src = tmp_path / "release"
    make_release(ref, str(src))
    torch.save({"x": Evil()}, src / "pytorch_model-00002-of-00002.bin")
    r = run(str(src), str(tmp_path / "out"))
    assert r.returncode != 0 and "cannot load as plain tensors" in r.stderr and "pwned" not in r.stdout
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(str(tmp_path / "out") + ".tmp")


def test_convert_checks_keys_against_config(ref, tmp_path):
    src = tmp_path / "release"
    make_release(ref, str(src))
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_query_tokens"] = 32
    (src / "config.json").write_text(json.dumps(cfg))
    r = run(str(src), str(tmp_path / "out"))
    assert r.returncode != 0 and "mis-shaped 1: query_tokens" in r.stderr
    assert not os.path.exists(tmp_path / "out")
