#!/usr/bin/env bash
# One GPU check, one table: run on a machine with one CUDA GPU (H100-class: <= 8 minutes, compiles included).
#   bash bench/gpu_check.sh                      # 7B shapes, bf16, random weights; nothing is downloaded
#   bash bench/gpu_check.sh --sections decode,int4 --budget 300   # extra flags go to bench/gpu_check.py
# Needs torch with CUDA (and, for the HF row, transformers from bench/requirements.txt). Each row is
# printed as it is measured (and appended to $OUT/gpu_check.md when OUT is set), so a run cut short
# keeps its rows. What each row means and the targets: bench/gpu_check.py's docstring, bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # random weights only: never reach for a hub
export TORCHINDUCTOR_FX_GRAPH_CACHE=1           # a second run reuses the compiled kernels
export PYTHONUNBUFFERED=1                       # every row reaches the log at once
PY="${PYTHON:-python}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv,noheader 2>/dev/null || true
timeout 570 "$PY" bench/gpu_check.py --device cuda --shape 7b --dtype bf16 "$@"
