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
