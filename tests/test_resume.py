"""train.py --resume and OUT against the red-team report (shared/design/redteam.md): a truncated or
pickled training state, changed arguments, a torn metrics line, an OUT that cannot be written, is a
model folder or a foreign one, a diverging run; all in this process, on the tiny stage-1 fixtures."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from owl.train.state import read_meta
from tests.conftest import REF, one_line, run_script
from tests.test_faults import TRAIN, data, s1  # noqa: F401  (data: the fixture)

OWL = os.path.join(REF, "mplug_owl")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    """A run stopped at step 2 (--stop-at), for the --resume cases; each copies it."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    train.main(s1(data, out, "--save-every", "1", "--max-steps", "4", "--stop-at", "2"))
    return out


def copy(stopped, tmp_path, name):
    shutil.copytree(stopped, tmp_path / name)
    return tmp_path / name


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling it creates the marker file
        return (open, (self.marker, "w"))


def test_truncated_or_pickled_training_state_is_refused(data, stopped, tmp_path, capsys):
    """Report 7.8 (truncated state files: tracebacks), 7.9 / B1 (a payload in state.pt ran on --resume)."""
    for name in ("state.json", "state.safetensors", "trainable.safetensors"):
        out = copy(stopped, tmp_path, name)
        f = out / "checkpoint" / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        words = "not valid JSON" if name == "state.json" else "cannot read safetensors"
        one_line(run_script(capsys, TRAIN, *s1(data, out, "--max-steps", "4", "--resume")), f"{f}: {words}")
    marker = tmp_path / "PWNED"
    out = copy(stopped, tmp_path, "pickled")
    torch.save({"step": 2, "x": Payload(str(marker))}, out / "checkpoint" / "state.pt")
    (out / "checkpoint" / "state.json").unlink()
    one_line(run_script(capsys, TRAIN, *s1(data, out, "--max-steps", "4", "--resume")),
             f"{out}/checkpoint/state.pt: a training state in the old pickle format is never read")
    out = copy(stopped, tmp_path, "beside")  # a state.pt next to the real state is never even opened
    torch.save({"x": Payload(str(marker))}, out / "checkpoint" / "state.pt")
    assert run_script(capsys, TRAIN, *s1(data, out, "--max-steps", "4", "--resume")).returncode == 0
    assert not marker.exists()


def test_resume_names_the_arguments_that_changed(data, stopped, tmp_path, capsys):
    """Report 7.2 (another --data: no word), 7.3 (--lr, --seed: no word), 7.4 (another --num-queries:
    a traceback). Continuing would be wrong: one line naming the flags, before any work; meaningful
    changes: a warning. (7.1, 7.5, 7.6, 7.7, one line or a warning already, stay so.)"""
    out = copy(stopped, tmp_path, "changed")
    base = s1(data, out, "--max-steps", "4", "--resume")
    for flag, value, words in (("--data", str(data / "other.jsonl"), f"--data {data}/other.jsonl (was {data}/caps.jsonl)"),
                               ("--num-queries", "4", "--num-queries 4 (was 8)"),
                               ("--seed", "7", "--seed 7 (was 42)")):
        r = run_script(capsys, TRAIN, *base, flag, value)
        one_line(r, f"--resume: {words}: not the run saved in {out}/checkpoint/state.json")
        assert "examples:" not in r.stdout  # before the data and the model are read
    r = run_script(capsys, TRAIN, *base, "--abstractor-layers", "2")  # 7.5: was one line, now names the flag
    one_line(r, "--abstractor-layers 2 (was 1)")
    r = run_script(capsys, TRAIN, *s1(data, out, "--stage", "2", "--init", OWL, "--max-steps", "4", "--resume"))
    one_line(r, "--stage 2 (was 1)", "--init")
    r = run_script(capsys, TRAIN, *base, "--batch-size", "3", "--max-steps", "1")  # 7.1, 7.6: warnings, it goes on
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(processes, batch, accumulation) were (1, 2, 1), now (1, 3, 1)" in r.stdout
    assert "warning: --resume with --max-steps 1 (was 4)" in r.stdout and (out / "model.safetensors").exists()
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [1, 2]  # the step-2 model, exported
    out = copy(stopped, tmp_path, "lr")
    r = run_script(capsys, TRAIN, *s1(data, out, "--max-steps", "4", "--resume"), "--lr", "0.5")
    assert r.returncode == 0 and "warning: --resume with --lr 0.5 (was 0.001)" in r.stdout, r.stderr[-2000:]
    empty = tmp_path / "none"  # 7.7: --resume with no checkpoint, or one without its state
    one_line(run_script(capsys, TRAIN, *s1(data, empty, "--resume")), f"--resume: {empty}/checkpoint does not exist")
    assert not empty.exists()
    out = copy(stopped, tmp_path, "nostate")
    os.remove(out / "checkpoint" / "state.json")
    one_line(run_script(capsys, TRAIN, *s1(data, out, "--max-steps", "4", "--resume")), "no training checkpoint to resume")


def test_a_torn_metrics_line_is_dropped_and_the_rewrite_is_atomic(data, stopped, tmp_path, capsys, monkeypatch):
    """Report 6.5 / B13 (a torn last line in metrics.jsonl: a traceback on --resume), 6.6 (a kill
    during the in-place rewrite emptied it)."""
    from owl.train import safety
    out = copy(stopped, tmp_path, "torn")
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('\0\0\0\0\n{"step": 3, "loss": 3.1')  # what power loss can leave; a kill mid-write
    before = metrics.read_text()

    def killed(*a):
        raise KeyboardInterrupt  # the rewrite dies just before its rename
    monkeypatch.setattr(safety.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        safety.trim_metrics(str(metrics), 2)
    assert metrics.read_text() == before  # all or nothing
    monkeypatch.undo()
    assert train.main(s1(data, out, "--max-steps", "4", "--resume")) == str(out)
    notes = capsys.readouterr().out
    assert f"note: {metrics}:3: dropped a torn or unreadable line" in notes and f"{metrics}:4: dropped" in notes
    assert [json.loads(l)["step"] for l in open(metrics)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- OUT

def test_an_unwritable_out_is_one_line(data, tmp_path, capsys, monkeypatch):
    """Report 6.9 / B14: an OUT that cannot be written: found before training (one line); one that
    stops being writable mid-run: one line (it was a traceback), the checkpoint intact."""
    r = run_script(capsys, TRAIN, *s1(data, "/proc/owl_train_test"))
    one_line(r, "--out /proc/owl_train_test: cannot write there")
    assert "examples:" not in r.stdout
    out = tmp_path / "ro"
    import owl.train.parallel as parallel
    real, calls = parallel.peak_mem_gb, []

    def then_unwritable(device):  # called once per step, just before the metrics line is written
        calls.append(1)
        if len(calls) == 3:
            os.remove(out / "metrics.jsonl")
            os.mkdir(out / "metrics.jsonl")
        return real(device)
    monkeypatch.setattr(parallel, "peak_mem_gb", then_unwritable)
    one_line(run_script(capsys, TRAIN, *s1(data, out, "--save-every", "1")), "Is a directory", "metrics.jsonl")
    assert read_meta(f"{out}/checkpoint")["step"] == 2


def test_out_is_never_a_model_folder_or_a_foreign_one(tmp_path, capsys):
    """Report 9.1 / B3: --init X --out X overwrote the base model; and 9.3 stays one line."""
    import hashlib
    x = tmp_path / "inplace"
    shutil.copytree(OWL, x)
    digest = hashlib.sha256((x / "model.safetensors").read_bytes()).hexdigest()
    s2 = lambda out, init=x: ["--stage", "2", "--init", str(init), "--data", str(tmp_path / "d.json"), "--out", str(out)]
    (tmp_path / "d.json").write_text('[{"instruction": "hi", "output": "yo"}]')
    one_line(run_script(capsys, TRAIN, *s2(x)), f"{x} is the source folder")
    other = tmp_path / "other_model"
    shutil.copytree(OWL, other)
    one_line(run_script(capsys, TRAIN, *s2(other, OWL)), f"--out {other} holds a model folder")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "mine" / "metrics.jsonl").write_text("")
    one_line(run_script(capsys, TRAIN, *s2(tmp_path / "mine", OWL)), "not this command's own output (notes.txt)")
    (tmp_path / "afile").write_text("x")  # 9.3 (one line already): --out a file, --init a file, or not a model
    one_line(run_script(capsys, TRAIN, *s2(tmp_path / "afile", OWL)), "is not this command's own output (afile)")
    one_line(run_script(capsys, TRAIN, *s2(tmp_path / "o", tmp_path / "afile")), "no such model folder")
    one_line(run_script(capsys, TRAIN, *s2(tmp_path / "o", os.path.join(REF, "hf_llama"))), "not an mPLUG-Owl model folder")
    assert hashlib.sha256((x / "model.safetensors").read_bytes()).hexdigest() == digest
    assert sorted(os.listdir(x)) == sorted(os.listdir(OWL)) and (tmp_path / "mine" / "notes.txt").exists()


def test_a_diverging_run_never_saves_non_finite_weights(data, tmp_path, capsys):
    """Report 7.10 / B12: after a NaN the message said the last checkpoint was intact, and it held
    non-finite weights (the update before the NaN loss had diverged). Nothing non-finite is saved
    now, and the message names the last good checkpoint."""
    out = tmp_path / "div"
    r = run_script(capsys, TRAIN, *s1(data, out, "--save-every", "1", "--lr", "1e4", "--grad-clip", "0"))
    line = one_line(r, "stopped before saving", f"the last good checkpoint is {out}/checkpoint, step ")
    step = read_meta(f"{out}/checkpoint")["step"]
    assert line.endswith(f"step {step})")
    assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoint" / "trainable.safetensors").values())
    # where the update itself diverges (the loss of that step still finite), the save refuses the weights
    from owl.train.state import CheckpointError
    from owl.train.state import save_training_state
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=f"step 5: the update made the weights non-finite; stopped before "
                                              f"saving them \\(the last good checkpoint is {out}/checkpoint, step {step}"):
        save_training_state(f"{out}/checkpoint", m, None, None, step=5, args={}, world=1, master=True)
    assert read_meta(f"{out}/checkpoint")["step"] == step
