#!/usr/bin/env bash
# The GPU check a session with a lent GPU runs in one call (< 8 minutes on one H100):
# GPU-marked tests (bf16 kernels vs torch, flash-attention error rule), then every bench stage at real
# shapes (ViT-B/16 and ViT-H/14, bf16, mixed DALI decoding). Installs nothing from the network.
# Leaves its history file in bench/history/ (and a copy plus logs in $OUT when that is set) to commit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-/tmp/maeflow-gpu-suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
timeout 120 "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
for stage in kernels model pipeline train; do
    timeout 150 "$PY" -m bench "$stage" --device gpu --quick 2>&1 | tee "$OUT/bench_$stage.log"
done
"$PY" -m bench report
cp bench/history/*gpu*.json bench/REPORT.md "$OUT/" 2>/dev/null
tail -n 40 bench/REPORT.md
