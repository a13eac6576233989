"""python -m owl.convert: released .bin shards -> safetensors, checked, never unpickling code."""
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

import owl
from tests.conftest import ROOT, call_main, one_line


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


def convert_main(capsys, *args):
    """python -m owl.convert's main in this process: (exit code, stdout, stderr)."""
    from owl.convert import main
    return call_main(capsys, main, *args)


def test_convert_never_replaces_what_it_did_not_write(ref, tmp_path, capsys):
    """Report 2.7 (a DST holding precious.txt and sub/ was emptied), 2.8 (DST == SRC lost the .bin
    shards), 2.9 (a DST file was renamed away): refused with one line, nothing touched. Redteam-2 1.17:
    DST must be new or empty, so an earlier conversion (or another model) is never replaced either."""
    src = tmp_path / "release"
    make_release(ref, str(src))
    dst = tmp_path / "dst"
    (dst / "sub").mkdir(parents=True)
    (dst / "precious.txt").write_text("precious")
    (dst / "sub" / "notes.txt").write_text("n")
    one_line(convert_main(capsys, src, dst), f"{dst} exists and is not empty (precious.txt, sub)")
    assert (dst / "precious.txt").read_text() == "precious" and (dst / "sub" / "notes.txt").exists()
    before = sorted(os.listdir(src))
    one_line(convert_main(capsys, src, src), f"{src} is the source folder")
    assert sorted(os.listdir(src)) == before and not os.path.exists(f"{src}.tmp")
    (tmp_path / "afile").write_text("mine")
    one_line(convert_main(capsys, src, tmp_path / "afile"), "exists and is not empty (afile)")
    assert (tmp_path / "afile").read_text() == "mine"
    new = tmp_path / "new"
    assert convert_main(capsys, src, new).returncode == 0
    one_line(convert_main(capsys, src, new), f"{new} exists and is not empty")  # never replaced, even by itself
    assert owl.load_model(str(new))[0] is not None


def test_convert_bad_index_and_unwritable_dst_are_one_line(ref, tmp_path, capsys):
    """Report 2.6 (an invalid pytorch_model.bin.index.json), 2.10 (a DST that cannot be written)."""
    src = tmp_path / "release"
    make_release(ref, str(src))
    index = src / "pytorch_model.bin.index.json"
    good = index.read_text()
    for text, words in (("{\n", "not valid JSON"), ('{"weight_map": 3}', "no weight_map")):
        index.write_text(text)
        one_line(convert_main(capsys, src, tmp_path / "out"), f"{index}: {words}")
    index.write_text(good)
    (tmp_path / "afile").write_text("x")
    for dst in ("/proc/owl_convert_test", tmp_path / "afile" / "out"):  # (as root too: no permission bits needed)
        one_line(convert_main(capsys, src, dst), "cannot write there")
    assert not os.path.exists(tmp_path / "out")


def test_convert_kinds_of_bin_files(ref, tmp_path, capsys):
    """The .bin rows that were clear already stay so (report 2.3: a legacy non-zip .bin; 2.4: another
    layout's keys, a DDP prefix, not a dict, truncated; 2.5: tied weights convert), each refused with
    its reason, nothing written; and a pickle payload never runs in any of them."""
    sd = load_file(os.path.join(ref, "mplug_owl", "model.safetensors"))
    marker = tmp_path / "PWNED"

    def release(name, save):
        d = tmp_path / name
        shutil.copytree(os.path.join(ref, "mplug_owl"), d)
        os.remove(d / "model.safetensors")
        save(d / "pytorch_model.bin")
        return d
    cases = {"legacy": (lambda f: torch.save(sd, f, _use_new_zipfile_serialization=False), "cannot load as plain tensors"),
             "ddp": (lambda f: torch.save({"module." + k: v for k, v in sd.items()}, f), "strip 'module.'"),
             "list": (lambda f: torch.save(list(sd.values()), f), "not a state dict of tensors"),
             "cut": (lambda f: (torch.save(sd, f), f.write_bytes(f.read_bytes()[:5000])), "cannot load as plain tensors"),
             "payload": (lambda f: torch.save({**sd, "x": Payload(str(marker))}, f), "cannot load as plain tensors")}
    for name, (save, words) in cases.items():
        r = convert_main(capsys, release(name, save), tmp_path / f"{name}_out")
        assert r.returncode == 1 and "Traceback" not in r.stderr and words in r.stderr, (name, r.stderr)
        assert not (tmp_path / f"{name}_out").exists()
    assert not marker.exists()
    tied = dict(sd, **{"language_model.lm_head.weight": sd["language_model.model.embed_tokens.weight"]})
    d = release("tied", lambda f: torch.save(tied, f))
    assert convert_main(capsys, d, tmp_path / "tied_out").returncode == 0
    got = owl.load_model(str(tmp_path / "tied_out"))[0].state_dict()["language_model.lm_head.weight"]
    assert torch.equal(got, sd["language_model.model.embed_tokens.weight"])


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling it would create the marker file
        return (open, (self.marker, "w"))
