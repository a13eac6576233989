"""bench/gpu_check.sh cannot run here (no GPU); its Python runs on the CPU at the tiny shape, so the
first GPU run does not die on a typo: every section prints its rows, with numbers (eager: compiling
every section on this CPU takes 3 minutes; `python bench/gpu_check.py --device cpu --shape tiny
--dtype fp32 --no-tests` does it). Rows reach stdout and $OUT/gpu_check.md as they are measured; a
failing section prints its error as its row and the others still run; a section the budget cannot
hold is skipped, saying so."""
import os
import subprocess
import sys

from tests.conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu", "--shape",
                        "tiny", "--dtype", "fp32", "--no-tests", "--no-compile"],
                       cwd=ROOT, env=dict(ENV, OUT=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| what")}
    assert "FAILED" not in rows.values() and "skipped" not in rows.values(), rows
    assert float(rows["device-to-device copy (GB/s)"]) > 0
    assert float(rows["decode b=1 eager, fused, 16 + 8 tok (tok/s)"]) > 0
    assert float(rows["decode step alone, eager (tok/s)"]) > 0
    assert float(next(v for k, v in rows.items() if k.startswith("first token, 1 image + "))) > 0
    assert float(rows["decode b=1 int8 (tok/s)"]) > 0 and float(rows["decode b=1 int4 g32 (tok/s)"]) > 0
    assert "kernel vs its dequantized weight: rel err" in r.stdout
    assert float(rows["train stage 1, 1 x 96 tok (tok/s)"]) > 0 and float(rows["train stage 2, 1 x 128 tok (tok/s)"]) > 0
    assert "gradient checkpointing off (CPU)" in r.stdout
    assert rows["DDP step, 1 process"] == "gloo"
    assert "max |param difference| vs no DDP 0.0e+00" in r.stdout  # one process: DDP changes nothing
    assert "8 decode steps alone, Int4Linear" in r.stdout and "first token, eager" in r.stdout  # the profiles
    written = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {k}" in written for k in rows)  # every row in $OUT too


def test_rows_survive_a_failing_section_and_the_budget(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch
    from gpu_check import Table
    t = Table(str(tmp_path), budget=100)
    t.run("copy", lambda: t.add("first", "1", "measured"), torch.device("cpu"))
    t.run("ddp", lambda: 1 / 0, torch.device("cpu"))
    t.budget = 0
    t.run("decode", lambda: t.add("never", "2"), torch.device("cpu"))
    lines = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert lines[0].startswith("| first") and "measured" in lines[0]
    assert "FAILED" in lines[1] and "ZeroDivisionError" in lines[1]
    assert "skipped" in lines[2] and "never" not in "".join(lines)


def test_gpu_check_sh_refuses_without_a_gpu():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run its whole check")
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], env=dict(ENV, PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no CUDA GPU" in r.stderr
