"""Hostile inputs of ../shared/design/redteam-2.md on the write side (issue 22), one test per row."""
import json
import os

import pytest

from owl.train.safety import RunLock, TrainError


def test_6_1_lock_link_is_refused_and_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("secret contents")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim, out / ".train.lock")
    lines = []
    with pytest.raises(TrainError, match="is a link"):
        with RunLock(str(out), log=lines.append):
            pass
    assert victim.read_text() == "secret contents" and not any("secret" in l for l in lines)


def test_6_2_tmp_link_is_not_written_through(tmp_path):
    from owl.fileio import write_atomic
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "adapter.json.tmp")
    write_atomic(str(tmp_path / "adapter.json"), "{}")
    assert victim.read_text() == "keep me" and (tmp_path / "adapter.json").read_text() == "{}"


@pytest.mark.parametrize("name", ["metrics.jsonl", "metrics.jsonl.tmp", "adapter.json.tmp", "checkpoint"])
@pytest.mark.parametrize("fresh", [True, False])
def test_6_1_run_folder_with_a_link_is_refused(tmp_path, name, fresh):
    from owl.train.safety import check_out
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    if name == "metrics.jsonl":
        (out / name).unlink()
    os.symlink(victim, out / name)
    with pytest.raises(TrainError, match="holds a link where the run writes"):
        check_out(str(out), [], fresh=fresh)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("alpha", ["NaN", "Infinity"])
def test_1_14_adapter_alpha_not_finite_is_refused(tmp_path, alpha):
    from owl.adapter import read_adapter_meta
    from owl.weights import WeightsError
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    (tmp_path / "adapter.json").write_text('{"r": 2, "alpha": %s, "targets": ["q_proj"]}' % alpha)
    with pytest.raises(WeightsError, match="alpha"):
        read_adapter_meta(str(tmp_path / "adapter.safetensors"))


@pytest.mark.parametrize("step", ["-5", "1.5", '"3"', "true"])
def test_4_6_state_json_step_is_checked(tmp_path, step):
    from owl.train.state import FORMAT, CheckpointError, read_meta
    (tmp_path / "trainable.safetensors").write_bytes(b"")
    (tmp_path / "state.json").write_text('{"format": %s, "step": %s}' % (json.dumps(FORMAT), step))
    with pytest.raises(CheckpointError, match="the training state is invalid"):
        read_meta(str(tmp_path))


def test_2_5_deeply_nested_json_is_one_line(tmp_path):
    from owl.fileio import read_json, read_jsonl
    (tmp_path / "a.json").write_text("[" * 200000)
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n' + "[" * 200000 + "\n")
    with pytest.raises(ValueError, match="a.json: malformed JSON"):
        read_json(str(tmp_path / "a.json"))
    with pytest.raises(ValueError, match="a.jsonl:2: malformed JSON"):
        read_jsonl(str(tmp_path / "a.jsonl"))


@pytest.mark.parametrize("key,value", [("rope_theta", 0), ("rms_norm_eps", -1.0), ("rope_theta", float("nan"))])
def test_1_7_config_out_of_range_is_refused(key, value):
    from owl.config import LlamaConfig
    with pytest.raises(ValueError, match=key):
        LlamaConfig(**{key: value})


def test_6_4_convert_refuses_a_link_leaving_the_model_folder(ref, tmp_path, capsys):
    """A README.md -> ~/.ssh/id_rsa in a downloaded folder is never copied into DST; the Hugging Face
    cache's own links (snapshots/REV/f -> ../../blobs/HASH) still are."""
    from owl.convert import main
    from tests.conftest import call_main, one_line
    from tests.test_convert import make_release
    src = tmp_path / "release"
    make_release(ref, str(src))
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY MATERIAL")
    os.symlink(secret, src / "README.md")
    one_line(call_main(capsys, main, src, tmp_path / "dst"), "README.md is a link", "outside the model folder")
    assert not (tmp_path / "dst").exists()
    os.remove(src / "README.md")  # the cache layout: every file a link into blobs/
    repo = tmp_path / "models--x"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True), blobs.mkdir()
    for f in os.listdir(src):
        os.replace(src / f, blobs / f)
        os.symlink(os.path.join("..", "..", "blobs", f), snap / f)
    r = call_main(capsys, main, snap, tmp_path / "dst2")
    assert r.returncode == 0, r.stderr
    assert not any(os.path.islink(tmp_path / "dst2" / f) for f in os.listdir(tmp_path / "dst2"))


def test_1_17_merge_never_replaces_a_model_folder(ref, tmp_path, capsys):
    from owl.convert import main
    from tests.conftest import call_main, one_line
    other = tmp_path / "other_model"
    other.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.model"):  # exactly the names merge writes
        (other / f).write_text("theirs")
    r = call_main(capsys, main, "merge", os.path.join(ref, "mplug_owl"), tmp_path / "no_adapter.safetensors", other)
    one_line(r, f"{other} exists and is not empty")
    assert all((other / f).read_text() == "theirs" for f in os.listdir(other))


def test_3_17_fresh_run_refuses_a_finished_runs_out(tmp_path):
    from owl.train.safety import check_out
    out = tmp_path / "finished"
    out.mkdir()
    for f in ("metrics.jsonl", "adapter.safetensors", "adapter.json", "model.safetensors", "config.json"):
        (out / f).write_text("x")  # a finished stage-2 run whose checkpoint/ was deleted
    with pytest.raises(TrainError, match="holds a finished run's model: pass --resume"):
        check_out(str(out), (), fresh=True)
    check_out(str(out), (), fresh=False)  # --resume of it is still the user's call


def test_2_7_an_error_in_a_dataloader_worker_ends_the_run(tmp_path):
    """A shard with no sample, read by a worker (--workers 1): the error in one line and exit 1, no hang."""
    import subprocess
    import sys
    import tarfile
    from tests.conftest import ROOT
    from tests.test_shards import shard_run
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    args = shard_run(str(tmp_path / "empty.tar"), tmp_path / "out", "--workers", "1")
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "hold no sample" in r.stderr, r.stderr[-2000:]


def _model_copy(ref, tmp_path, name):
    import shutil
    d = tmp_path / name
    shutil.copytree(os.path.join(ref, "mplug_owl"), d)
    return d


def test_1_7_a_nan_weight_is_refused_at_load(ref, tmp_path):
    from safetensors.torch import load_file, save_file
    from owl.weights import WeightsError
    import owl
    d = _model_copy(ref, tmp_path, "nan")
    f = [x for x in os.listdir(d) if x.endswith(".safetensors")][0]
    sd = load_file(d / f)
    k = next(k for k, v in sd.items() if v.is_floating_point() and "norm" in k)
    sd[k][0] = float("nan")
    save_file(sd, d / f)
    with pytest.raises(WeightsError, match=f"{k} holds NaN"):
        owl.load_model(str(d))


def test_1_10_a_stray_file_with_the_same_tensors_is_refused(ref, tmp_path):
    import shutil
    from owl.weights import WeightsError
    import owl
    d = _model_copy(ref, tmp_path, "dup")
    f = [x for x in os.listdir(d) if x.endswith(".safetensors")][0]
    shutil.copy(d / f, d / "model_backup.safetensors")
    with pytest.raises(WeightsError, match="two files hold the same tensors"):
        owl.load_model(str(d))


def test_1_11_a_weight_file_linked_to_a_device_is_not_hashed_forever(ref, tmp_path):
    from owl.adapter import sha256_of
    from owl.weights import WeightsError
    d = _model_copy(ref, tmp_path, "devzero")
    os.symlink("/dev/zero", d / "extra.safetensors")
    with pytest.raises(WeightsError, match="not a regular file"):
        sha256_of(str(d))


def test_2_9_a_huge_brace_range_is_refused_before_it_is_built():
    from owl.train.data import DataError
    from owl.train.shards import shard_files
    with pytest.raises(DataError, match="names 10,000,000,000 shards"):
        shard_files("/nowhere/{00000..9999999999}.tar")


def test_2_10_a_gzipped_shard_is_named(tmp_path):
    from owl.train.data import DataError
    from owl.train.shards import shard_files
    (tmp_path / "s.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="gzipped shards are not supported"):
        shard_files(str(tmp_path / "s.tar.gz"))


# ----------------------------------------------------------------------------- round 2, files a user is sent

def _edit_config(d, edit):
    with open(d / "config.json") as f:
        c = json.load(f)
    edit(c)
    with open(d / "config.json", "w") as f:
        json.dump(c, f)


@pytest.mark.parametrize("section,key,value", [
    ("vision_config", "hidden_size", 10 ** 9),  # 1.2: overflowed building the ViT on the meta device
    ("text_config", "num_hidden_layers", 3),
    ("text_config", "num_hidden_layers", 10 ** 6),  # 1.3: minutes building a million meta layers
    ("visual_abstractor_config", "intermediate_size", 10 ** 17),
    ("vision_config", "patch_size", 10 ** 9)])
def test_1_2_1_3_config_sizes_the_weights_contradict_are_refused_before_building(ref, tmp_path, section, key, value):
    import owl
    from owl.memory import load_cfg
    from owl.weights import WeightsError
    d = _model_copy(ref, tmp_path, "big")

    def edit(c):
        c[section][key] = value
        if section == "vision_config" and key == "hidden_size":
            c["visual_abstractor_config"]["encoder_hidden_size"] = value
    _edit_config(d, edit)
    with pytest.raises(WeightsError, match=f"config.json: {section}.{key} is {value:,} but the weights hold"):
        owl.load_model(str(d))
    with pytest.raises(WeightsError, match=f"{section}.{key}"):  # python -m owl.memory DIR, too
        load_cfg(str(d))


def test_1_2_1_3_hf_configs_are_checked_too(ref, tmp_path):
    import shutil
    import owl
    from owl.weights import WeightsError
    for name, section, load in (("hf_llama", None, owl.load_llama), ("hf_clip", "vision_config", owl.load_vision)):
        d = tmp_path / name
        shutil.copytree(os.path.join(ref, name), d)
        _edit_config(d, lambda c: (c[section] if section else c).__setitem__("num_hidden_layers", 10 ** 6))
        with pytest.raises(WeightsError, match="num_hidden_layers is 1,000,000 but the weights hold"):
            load(str(d))


def test_1_4_an_absurd_context_is_refused(ref, tmp_path, owl_model, monkeypatch):
    import owl
    from owl.chat.session import ChatError, ChatSession
    from owl.weights import WeightsError
    d = _model_copy(ref, tmp_path, "ctx")
    _edit_config(d, lambda c: c["text_config"].__setitem__("max_position_embeddings", 10 ** 9))
    with pytest.raises(WeightsError, match="config.json: text_config: max_position_embeddings 1000000000 is more than"):
        owl.load_model(str(d))
    model, tok = owl_model  # a context that is legal but whose KV cache does not fit: one line naming --context
    session = ChatSession(model, tok, max_new_tokens=2)

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 384000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(model.language_model, "setup_caches", no_memory)
    with pytest.raises(ChatError, match="does not fit in memory.*--context"):
        session.ask("What is it?")


def _sentencepiece(path, **kw):
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    text = ["the cat sat on the mat", "a dog ran in the park", "what is it here now"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, model_type="bpe", vocab_size=40,
                                   hard_vocab_limit=False, minloglevel=2, **kw)
    path.write_bytes(buf.getvalue())


def test_1_12_a_tokenizer_that_does_not_fit_the_config_is_refused(ref, tmp_path):
    import owl
    from owl.tokenizer import Tokenizer
    from owl.weights import WeightsError
    d = _model_copy(ref, tmp_path, "tok_big")  # 1000 pieces, the config says 500: ids past the embedding
    _edit_config(d, lambda c: c["text_config"].__setitem__("vocab_size", 500))
    with pytest.raises(WeightsError, match="tokenizer.model has 1000 pieces, more than config.json's vocab_size 500"):
        owl.load_model(str(d))
    d = _model_copy(ref, tmp_path, "tok_nobos")
    _sentencepiece(d / "tokenizer.model", bos_id=-1)
    with pytest.raises(WeightsError, match="tokenizer.model has no BOS"):
        owl.load_model(str(d))
    # fewer pieces than vocab_size is legal (padding rows, as the demo's tokenizer has): a sampled id past the
    # tokenizer's pieces decodes to nothing instead of sentencepiece's IndexError
    tok = Tokenizer(os.path.join(ref, "mplug_owl", "tokenizer.model"))
    assert tok.decode([5, 1000, 1500]) == tok.decode([5])


def test_1_13_adapter_r_that_the_tensors_contradict_is_refused_before_allocating(ref, tmp_path):
    from safetensors.torch import save_file
    import owl
    from owl.weights import WeightsError
    src, _ = owl.load_model(os.path.join(ref, "mplug_owl"))
    owl.apply_lora(src.language_model, ("q_proj",), 8, 16, 0.0)
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if "lora_" in k}, tmp_path / "adapter.safetensors")
    for r in (16, 100_000_000):  # 1e8: apply_lora tried to allocate 38 GB
        (tmp_path / "adapter.json").write_text(json.dumps({"r": r, "alpha": 16, "targets": ["q_proj"]}))
        model, _ = owl.load_model(os.path.join(ref, "mplug_owl"))
        with pytest.raises(WeightsError, match=f"adapter.json: r {r:,} but .*lora_A has rank 8"):
            owl.apply_adapter(model, str(tmp_path / "adapter.safetensors"))
        assert not any("lora_" in k for k in model.state_dict())  # refused before any LoRA layer was made


# ----------------------------------------------------------------------------- round 2, data

def test_2_3_a_huge_shard_member_is_refused_by_its_header(tmp_path, monkeypatch):
    import io
    import tarfile
    import owl
    from owl.train import shards
    from tests.test_shards import TOK, png
    monkeypatch.setattr(shards, "MAX_MEMBER", 4000, raising=False)  # (64 MiB: a sparse 1 GiB member stands for it here)
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("k0001.png", png(0)), ("k0001.txt", b"a caption " * 1000), ("k0002.png", png(1)),
                           ("k0002.txt", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    reads = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: reads.append(m.name) or real(self, m))
    lines = []
    counts = shards.check_shards([str(tmp_path / "s.tar")], owl.load_tokenizer(os.path.dirname(TOK)), 512,
                                 log=lines.append)
    assert counts["bad"] == 1 and counts["usable"] == 1, lines
    assert f"{tmp_path / 's.tar'}: member k0001.txt is 10,000 bytes (more than 4,000)" in lines[0]
    assert "k0001.txt" not in reads  # never read


# ----------------------------------------------------------------------------- round 2, train.py --resume and export

from tests.test_faults import TRAIN, data, s1  # noqa: E402,F401  (data: the fixture)
from tests.test_resume import copy as _copy_run, stopped  # noqa: E402,F401  (stopped: the fixture, a run stopped at step 2)


def test_3_14_disk_full_at_export_is_one_line_and_the_checkpoint_stays(data, stopped, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError
    import owl.weights
    from owl.train.state import complete, read_meta
    from tests.conftest import one_line, run_script

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(owl.weights, "save_file", full)
    out = _copy_run(stopped, tmp_path, "full")
    r = run_script(capsys, TRAIN, *s1(data, out, "--max-steps", "3", "--resume"))
    one_line(r, f"{out}", "No space left on device", "--resume")
    assert complete(str(out / "checkpoint")) and read_meta(str(out / "checkpoint"))["step"] == 3
    assert not (out / "model.safetensors").exists() and not any(".export" in f for f in os.listdir(out))


def test_4_7_a_checkpoint_past_max_steps_is_exported_with_a_note(data, stopped, tmp_path, capsys):
    from tests.conftest import run_script
    out = _copy_run(stopped, tmp_path, "big")
    f = out / "checkpoint" / "state.json"
    meta = json.loads(f.read_text())
    meta["step"] = 1000000
    f.write_text(json.dumps(meta))
    r = run_script(capsys, TRAIN, *s1(data, out, "--max-steps", "4", "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: the checkpoint is at step 1000000, past --max-steps 4: exporting it as is" in r.stdout
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("field,edit", [
    ("step", lambda m: m.__setitem__("step", "3")),
    ("step", lambda m: m.__setitem__("step", 3.5)),
    ("rng.0.python", lambda m: m["rng"][0]["python"].__setitem__(1, m["rng"][0]["python"][1][:10])),
    ("rng.0.numpy", lambda m: m["rng"][0]["numpy"].__setitem__(1, [])),
    ("args.batch_size", lambda m: m["args"].pop("batch_size")),
    ("optimizer.param_groups.0.betas", lambda m: m["optimizer"]["param_groups"][0].__setitem__("betas", [0.9])),
    ("optimizer.param_groups.0.lr", lambda m: m["optimizer"]["param_groups"][0].__setitem__("lr", "fast"))])
def test_4_8_state_json_fields_are_checked(data, stopped, tmp_path, capsys, field, edit):
    from tests.conftest import one_line, run_script
    out = _copy_run(stopped, tmp_path, "edited")
    f = out / "checkpoint" / "state.json"
    meta = json.loads(f.read_text())
    edit(meta)
    f.write_text(json.dumps(meta))
    metrics = (out / "metrics.jsonl").read_bytes()
    r = run_script(capsys, TRAIN, *s1(data, out, "--max-steps", "4", "--resume"))
    one_line(r, f"{f}: the training state is invalid ({field}")
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_4_10_a_non_finite_checkpoint_is_refused_at_resume(data, stopped, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from tests.conftest import one_line, run_script
    out = _copy_run(stopped, tmp_path, "nanck")
    f = out / "checkpoint" / "trainable.safetensors"
    sd = load_file(f)
    k = sorted(sd)[0]
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, f)
    r = run_script(capsys, TRAIN, *s1(data, out, "--max-steps", "4", "--resume"))
    one_line(r, f"{f}: {k} holds non-finite values")


# ----------------------------------------------------------------------------- round 2, the demo

def test_3_18_the_demo_refuses_an_out_with_other_files(tmp_path, monkeypatch):
    from owl.demo import run as demo
    ran = []
    monkeypatch.setattr(demo, "_run_demo", lambda *a: ran.append(a))  # (the demo itself takes minutes)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "world").mkdir()
    with pytest.raises(demo.DemoError, match=f"{tmp_path} holds notes.txt, which the demo does not write"):
        demo.run_demo(str(tmp_path), quick=True)
    assert not ran and sorted(os.listdir(tmp_path)) == ["notes.txt", "world"]
    (tmp_path / "notes.txt").unlink()  # only names the demo writes (an interrupted run's world/): it goes on
    demo.run_demo(str(tmp_path), quick=True)
    assert ran
