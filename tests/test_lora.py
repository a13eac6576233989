"""LoRA (owl/lora.py): B = 0 equals the base model, merged equals unmerged, only LoRA trains, and
the adapter files (owl/adapter.py) round-trip and merge (python -m owl.convert merge)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import owl
from owl.adapter import save_adapter
from owl.convert import main
from owl.lora import LoRALinear, apply_lora, lora_state_dict, mark_only_lora_as_trainable, merge_lora
from tests.conftest import REF, ROOT, call_main, one_line, tiny_batch, tiny_model


def test_lora_zero_B_equals_base_and_merge_equals_unmerged():
    m = tiny_model()
    ids, px = tiny_batch()
    with torch.no_grad():
        base = m(ids, px)
    names = apply_lora(m.language_model, ("q_proj", "v_proj"), r=4, alpha=16, dropout=0.0)
    assert len(names) == 2 * m.config.text_config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(m(ids, px), base)  # B = 0: step 0 is the base model
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(std=0.5)
        unmerged = m(ids, px)
        assert (unmerged - base).abs().max() > 1e-3  # the adapter now matters
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.merge()
        merged = m(ids, px)
        assert torch.allclose(merged, unmerged, atol=1e-5)
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.unmerge()
        assert torch.allclose(m(ids, px), unmerged, atol=1e-5)
        merge_lora(m)  # fold and put plain nn.Linear back
        assert not any(isinstance(x, LoRALinear) for x in m.modules())
        assert torch.allclose(m(ids, px), unmerged, atol=1e-5)


def test_lora_trainable_and_adapter_state_dict():
    m = tiny_model()
    apply_lora(m.language_model, ("q_proj", "v_proj"), r=2, alpha=4, dropout=0.1)
    mark_only_lora_as_trainable(m)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    sd = lora_state_dict(m)
    L = m.config.text_config.num_hidden_layers
    assert len(sd) == 2 * 2 * L and all(k.endswith(("lora_A", "lora_B")) for k in sd)
    q = m.language_model.model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (2, 96) and q.lora_B.shape == (96, 2) and q.scaling == 2.0
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in m.state_dict()  # base name kept


def test_apply_adapter_round_trip(tmp_path):
    m = tiny_model()
    apply_lora(m.language_model, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for layer in m.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_()
        m.abstractor.vit_eos.add_(1.0)  # a trained non-LoRA tensor travels in the adapter too
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if "lora_" in k or k.startswith("abstractor.")}
    save_file(sd, tmp_path / "adapter.safetensors")
    (tmp_path / "adapter.json").write_text(json.dumps({"r": 4, "alpha": 8, "dropout": 0.0,
                                                       "targets": ["q_proj", "v_proj"]}))
    m2 = tiny_model()
    owl.apply_adapter(m2, str(tmp_path / "adapter.safetensors"))
    ids, px = tiny_batch()
    with torch.no_grad():
        assert torch.equal(m2(ids, px), m(ids, px))


# ----------------------------------------------------------------------------- python -m owl.convert merge (red-team cases)

BASE = os.path.join(REF, "mplug_owl")


def make_adapter(base, out_dir, seed=0):
    """A stage-2 style adapter of `base` (random B, so it matters), written as train.py writes one."""
    model, _ = owl.load_model(base)
    apply_lora(model.language_model, ("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    mark_only_lora_as_trainable(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(std=0.5)
    os.makedirs(out_dir, exist_ok=True)
    save_adapter(model, str(out_dir), dict(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"]), base)
    return os.path.join(out_dir, "adapter.safetensors")


def merged_here(base, adapter):
    model, _ = owl.load_model(base, dtype=None)
    owl.apply_adapter(model, adapter)
    merge_lora(model)
    return model.state_dict()


def lora_main(capsys, *args):
    return call_main(capsys, main, *args)


def test_merge_cli_runs_as_documented(tmp_path):
    """Report 4.16: `python -m owl.lora merge BASE ADAPTER OUT` (README) failed, after runpy's
    RuntimeWarning that owl.lora was imported twice; it is `python -m owl.convert merge` now. A real
    process, as a user runs it."""
    adapter, out = make_adapter(BASE, tmp_path / "s2"), tmp_path / "merged"
    r = subprocess.run([sys.executable, "-W", "default", "-m", "owl.convert", "merge", BASE, adapter, str(out)], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no RuntimeWarning either
    got, want = load_file(out / "model.safetensors"), merged_here(BASE, adapter)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["language_model.model.layers.0.self_attn.q_proj.weight"],
                           load_file(os.path.join(BASE, "model.safetensors"))["language_model.model.layers.0.self_attn.q_proj.weight"])


def test_merge_refuses_bad_adapters_and_destinations_it_did_not_write(tmp_path, capsys):
    """Report 4.17 (a garbage adapter or adapter.json: tracebacks), 4.18 (OUT = the stage-2 folder
    or BASE was emptied), 4.13 for merge (an adapter of another base, merged silently)."""
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    s2 = tmp_path / "s2"
    adapter = make_adapter(str(base), s2)
    (s2 / "metrics.jsonl").write_text('{"step": 1}\n')
    one_line(lora_main(capsys, "merge", base, adapter, s2), f"{s2} is the source folder")
    one_line(lora_main(capsys, "merge", base, adapter, base), f"{base} is the source folder")
    assert sorted(os.listdir(s2)) == ["adapter.json", "adapter.safetensors", "metrics.jsonl"]
    assert sorted(os.listdir(base)) == sorted(os.listdir(BASE))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    one_line(lora_main(capsys, "merge", base, adapter, tmp_path / "mine"), "exists and is not empty (notes.txt)")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(s2 / "adapter.json", bad / "adapter.json")
    (bad / "adapter.safetensors").write_bytes(np.random.default_rng(0).bytes(3000))
    one_line(lora_main(capsys, "merge", base, bad / "adapter.safetensors", tmp_path / "o"), "cannot read safetensors")
    (bad / "adapter.json").write_text("{not json")
    one_line(lora_main(capsys, "merge", base, bad / "adapter.safetensors", tmp_path / "o"), "adapter.json: not valid JSON")
    other = tmp_path / "other"  # the same shapes, another base: refused unless asked for
    shutil.copytree(s2, other)
    meta = json.loads((other / "adapter.json").read_text())
    (other / "adapter.json").write_text(json.dumps({**meta, "base_sha256": "0" * 64, "base": "/elsewhere"}))
    one_line(lora_main(capsys, "merge", base, other / "adapter.safetensors", tmp_path / "o"),
             "was trained on another base model (/elsewhere", "--ignore-adapter-base")
    assert not (tmp_path / "o").exists()
    out = tmp_path / "merged"
    assert lora_main(capsys, "merge", base, other / "adapter.safetensors", out, "--ignore-adapter-base").returncode == 0
    one_line(lora_main(capsys, "merge", base, other / "adapter.safetensors", out, "--ignore-adapter-base"),
             "exists and is not empty")  # a finished model is never replaced, even its own (redteam-2 1.17)
    want = merged_here(str(base), adapter)
    assert all(torch.equal(v, want[k]) for k, v in load_file(out / "model.safetensors").items())
