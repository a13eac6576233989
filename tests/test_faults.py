"""train.py when a run is stopped from outside (the red-team report, shared/design/redteam.md):
SIGKILL at random points, a kill between the two renames of a checkpoint save, one during the export,
Ctrl-C and SIGTERM, two runs into one OUT. Every resumed run must end bitwise equal to the
uninterrupted one. All on the tiny stage-1 fixtures (a few seconds per process). The --resume and
OUT cases that need no second process are in test_resume.py."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from owl.train.state import read_meta
from tests.conftest import REF, ROOT, noise_images, one_line, run_script

CLIP, LLAMA = (os.path.join(REF, d) for d in ("hf_clip", "hf_llama"))
TRAIN = os.path.join(ROOT, "train.py")
STEPS = 40
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """9 captions, one of them with an unreadable image (replaced deterministically at read time)."""
    d = tmp_path_factory.mktemp("faults_data")
    noise_images(d)
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



def test_a_kill_during_the_export_is_redone_by_resume(reference, data, tmp_path, monkeypatch):
    """Report 6.4 (OK before, kept): a kill during the final export, after its first file moved into
    OUT; --resume (0 steps left) exports again, bitwise the uninterrupted run's model."""
    out = tmp_path / "export"
    shutil.copytree(reference, out)
    for f in ("model.safetensors", "config.json"):
        os.remove(out / f)
    real, moves = os.replace, []

    def killed_at_the_second_move(src, dst):
        if "/.export/" in src:
            moves.append(src)
            if len(moves) == 2:
                raise KeyboardInterrupt  # (the process dies here)
        real(src, dst)
    monkeypatch.setattr(os, "replace", killed_at_the_second_move)
    with pytest.raises(KeyboardInterrupt):
        train.main(s1(data, out, "--save-every", "0", "--resume"))
    monkeypatch.undo()
    assert (out / ".export").is_dir() and len(os.listdir(out / ".export")) >= 2
    assert train.main(s1(data, out, "--save-every", "0", "--resume")) == str(out)
    assert_equals_reference(out, reference)
    assert not (out / ".export").exists() and not (out / ".train.lock").exists()


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
