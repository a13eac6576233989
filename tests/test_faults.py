"""train.py when things go wrong (the red-team report, shared/design/redteam.md): SIGKILL at random
points, a kill between the two renames of a checkpoint save, Ctrl-C and SIGTERM, two runs into one
OUT, a torn metrics line, a truncated or pickled training state, changed arguments on --resume, an
OUT that cannot be written or is a model folder, a diverging run. Every resumed run must end bitwise
equal to the uninterrupted one. All on the tiny stage-1 fixtures (a few seconds per process)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from owl.train.state import read_meta
from tests.conftest import REF, ROOT, one_line, run_script

CLIP, LLAMA, OWL = (os.path.join(REF, d) for d in ("hf_clip", "hf_llama", "mplug_owl"))
TRAIN = os.path.join(ROOT, "train.py")
STEPS = 40
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """9 captions, one of them with an unreadable image (replaced deterministically at read time)."""
    d = tmp_path_factory.mktemp("faults_data")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (30 + 4 * i, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG not really")
    recs = [{"image": f"{i % 6}.png", "caption": f"picture {i} of noise"} for i in range(8)]
    recs.insert(4, {"image": "corrupt.png", "caption": "never read"})
    (d / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:5]))
    return d


def s1(data, out, *extra):
    return ["--stage", "1", "--vision-init", CLIP, "--llm-init", LLAMA, "--data", str(data / "caps.jsonl"),
            "--out", str(out), "--num-queries", "8", "--abstractor-layers", "1", "--abstractor-heads", "2",
            "--abstractor-mlp", "64", "--max-steps", str(STEPS), "--eval-every", "0", "--dropout", "0.1", "--lr", "1e-3",
            "--warmup-steps", "2", "--batch-size", "2", "--max-bad-fraction", "0.5", *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run (dropout on: the RNG state must be restored exactly too)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    train.main(s1(data, out, "--save-every", "0"))
    return out


def assert_equals_reference(out, reference):
    for f in ("model.safetensors", "checkpoint/trainable.safetensors"):
        a, b = load_file(out / f), load_file(reference / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f  # bitwise
    rows = lambda d: [json.loads(l) for l in open(d / "metrics.jsonl")]
    assert [r["step"] for r in rows(out)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(reference)]


def start(args, log):
    return subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def last_step(out):
    try:
        return max((json.loads(l)["step"] for l in open(out / "metrics.jsonl") if l.strip().endswith("}")), default=0)
    except FileNotFoundError:
        return 0


def wait_for_step(p, out, step, timeout=120):
    """Poll until metrics.jsonl reaches `step` (True) or the process ends (False)."""
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if last_step(out) >= step:
            return True
        time.sleep(0.005)
    return False


# ----------------------------------------------------------------------------- kills

def test_sigkill_loop_then_resume_equals_an_uninterrupted_run(data, reference, tmp_path, capsys):
    """Report 6.1/6.2 kept, 8.x (a dead run's lock is taken over): 3 SIGKILLs at seeded random points
    (a few steps on, then 0-30 ms into a step: often inside a checkpoint save, --save-every 1), each
    followed by --resume; the end is bitwise the uninterrupted run."""
    out, rng, kills = tmp_path / "k", random.Random(14), 0
    args = s1(data, out, "--save-every", "1")
    for i in range(3):
        resume = any(os.path.isdir(f"{out}/checkpoint{s}") for s in ("", ".tmp", ".old"))
        p = start(args + ["--resume"] * resume, tmp_path / f"run{i}.log")
        if wait_for_step(p, out, last_step(out) + rng.randint(3, 7)):
            time.sleep(rng.uniform(0, 0.03))
            p.kill()
            kills += 1
        p.wait()
    assert kills == 3, [open(tmp_path / f"run{i}.log").read()[-2000:] for i in range(3)]
    assert "took over" in open(tmp_path / "run2.log").read()  # the lock of the killed run before it
    assert train.main(args + ["--resume"]) == str(out)
    assert "took over" in capsys.readouterr().out
    assert_equals_reference(out, reference)


KILL_BETWEEN_RENAMES = """
import os, runpy, signal, sys
real, n = os.replace, []
def replace(src, dst):  # SIGKILL right after atomic_dir's first rename (checkpoint -> checkpoint.old)
    real(src, dst)
    if dst.endswith(os.sep + "checkpoint.old"):
        n.append(dst)
        if len(n) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_between_the_renames_is_recovered_and_resume_is_exact(data, reference, tmp_path, capsys):
    """Report 6.3 / B7: a kill between the two renames of a save left checkpoint.old and a complete
    checkpoint.tmp and no checkpoint/: --resume refused, and a fresh run deleted checkpoint.old."""
    out = tmp_path / "w"
    r = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, TRAIN, *s1(data, out, "--save-every", "1")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == [".train.lock", "checkpoint.old", "checkpoint.tmp", "metrics.jsonl"]
    assert (read_meta(f"{out}/checkpoint.old")["step"], read_meta(f"{out}/checkpoint.tmp")["step"]) == (3, 4)
    r = run_script(capsys, TRAIN, *s1(data, out, "--save-every", "1"))  # a fresh run: refused, nothing lost
    one_line(r, f"{out}/checkpoint exists: pass --resume")
    assert "recovered from checkpoint.tmp" in r.stdout and read_meta(f"{out}/checkpoint")["step"] == 4
    assert train.main(s1(data, out, "--save-every", "1", "--resume")) == str(out)
    assert_equals_reference(out, reference)


def test_sigint_and_sigterm_save_a_checkpoint_and_resume_is_exact(data, reference, tmp_path):
    """Report 6.7, 6.8, B14: Ctrl-C gave a KeyboardInterrupt traceback and no save (with
    --save-every 0 every step was lost). Now SIGINT and SIGTERM save at the step in progress, exit
    128 + signal with one line, and --resume ends bitwise the uninterrupted run."""
    for sig, every in ((signal.SIGINT, "0"), (signal.SIGTERM, "7")):
        out = tmp_path / sig.name
        p = start(s1(data, out, "--save-every", every), tmp_path / f"{sig.name}.log")
        assert wait_for_step(p, out, 5)
        p.send_signal(sig)
        assert p.wait(timeout=120) == 128 + sig
        log = open(tmp_path / f"{sig.name}.log").read()
        step = read_meta(f"{out}/checkpoint")["step"]
        assert "Traceback" not in log and 5 <= step < STEPS and last_step(out) == step
        assert log.rstrip().endswith(f"stopped by {sig.name} at step {step}: the checkpoint {out}/checkpoint is "
                                     f"saved; the same command with --resume continues exactly")
        assert not (out / "model.safetensors").exists()
        train.main(s1(data, out, "--save-every", every, "--resume"))
        assert_equals_reference(out, reference)


def test_a_second_run_into_the_same_out_is_refused(data, tmp_path, capsys):
    """Report 8.1, 8.2, B8: two runs into one OUT both went on, their metrics interleaved."""
    out = tmp_path / "cc"
    p = start(s1(data, out, "--save-every", "0", "--max-steps", "2000"), tmp_path / "a.log")
    try:
        assert wait_for_step(p, out, 2)
        r = run_script(capsys, TRAIN, *s1(data, out, "--save-every", "0", "--seed", "5"))
        one_line(r, f"--out {out} is in use by another run (pid {p.pid} on ", "wait for it to end, or choose another")
        steps = [json.loads(l)["step"] for l in open(out / "metrics.jsonl") if l.endswith("}\n")]
        assert steps == list(range(1, len(steps) + 1))  # the first run's lines only
    finally:
        p.kill()
        p.wait()
    assert train.main(s1(data, out, "--save-every", "0", "--max-steps", "2")) == str(out)
    assert f"took over {out}/.train.lock from pid {p.pid} on " in capsys.readouterr().out
    assert not (out / ".train.lock").exists()  # released at the end


# ----------------------------------------------------------------------------- resume

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
        words = "cannot read the training state" if name == "state.json" else "cannot read safetensors"
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
    changes: a warning."""
    out = copy(stopped, tmp_path, "changed")
    base = s1(data, out, "--max-steps", "4", "--resume")
    for flag, value, words in (("--data", str(data / "other.jsonl"), f"--data {data}/other.jsonl (was {data}/caps.jsonl)"),
                               ("--num-queries", "4", "--num-queries 4 (was 8)"),
                               ("--seed", "7", "--seed 7 (was 42)")):
        r = run_script(capsys, TRAIN, *base, flag, value)
        one_line(r, f"--resume: {words}: not the run saved in {out}/checkpoint/state.json")
        assert "examples:" not in r.stdout  # before the data and the model are read
    r = run_script(capsys, TRAIN, *base, "--lr", "0.5")
    assert r.returncode == 0 and "warning: --resume with --lr 0.5 (was 0.001)" in r.stdout, r.stderr[-2000:]


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
    """Report 9.1 / B3: --init X --out X overwrote the base model."""
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
    from owl import CheckpointError
    from owl.train.state import save_training_state
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=f"step 5: the update made the weights non-finite; stopped before "
                                              f"saving them \\(the last good checkpoint is {out}/checkpoint, step {step}"):
        save_training_state(f"{out}/checkpoint", m, None, None, step=5, args={}, world=1, master=True)
    assert read_meta(f"{out}/checkpoint")["step"] == step
