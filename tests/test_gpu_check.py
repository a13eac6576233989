"""bench/gpu_check.sh cannot run here (no GPU); its Python runs on the CPU at the tiny shape, so the
first GPU run does not die on a typo: every row of the table is printed, with numbers."""
import os
import subprocess
import sys

from tests.conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_gpu_check_smoke_run_on_cpu():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu", "--shape",
                        "tiny", "--dtype", "fp32", "--no-tests", "--no-compile"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| what")}
    assert float(rows["device-to-device copy (GB/s)"]) > 0
    assert float(rows["decode b=1 eager (tok/s)"]) > 0
    assert float(rows["first token, 1 image + 16 tok (ms)"]) > 0
    assert float(rows["train stage 1, 1 x 96 tok (tok/s)"]) > 0 and float(rows["train stage 2, 1 x 128 tok (tok/s)"]) > 0
    assert rows["DDP step, 1 process"] == "gloo"
    assert "max |param difference| vs no DDP 0.0e+00" in r.stdout  # one process: DDP changes nothing


def test_gpu_check_sh_refuses_without_a_gpu():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run its whole check")
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], env=dict(ENV, PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no CUDA GPU" in r.stderr
