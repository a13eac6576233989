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
