#!/usr/bin/env bash
# The GPU check a session with a lent GPU runs in one call (< 8 minutes on one H100):
# GPU-marked tests (bf16 kernels vs torch, flash-attention error rule), then every bench stage at real
# shapes (ViT-B/16 and ViT-H/14, bf16, mixed DALI decoding). Installs nothing from the network.
# Leaves its history file in bench/history/ (and a copy plus logs in $OUT when that is set) to commit.
# The lent GPU machine has torch and triton but not DALI, DeepSpeed, webdataset or braceexpand: stages
# needing them say "skipped". They travel as wheels for Python 3.12 (see the device tool's README);
# nvidia-dali-cuda130 alone is ~200 MB, over one call's 64 MiB, so it must go in parts over several
# calls to a warm machine (split -b 60M; cat the parts there; pip install --no-deps --target).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-/tmp/maeflow-gpu-suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 60 "$PY" -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tee "$OUT/gpu_tests.log"
for stage in kernels model pipeline train; do
    timeout 100 "$PY" -m bench "$stage" --device gpu --quick 2>&1 | tee "$OUT/bench_$stage.log"
done
"$PY" -m bench report
cp bench/history/*gpu*.json bench/REPORT.md "$OUT/" 2>/dev/null
tail -n 40 bench/REPORT.md
