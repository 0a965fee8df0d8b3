#!/usr/bin/env bash
# The GPU check, on any machine with a CUDA GPU and maeflow's packages installed (`bash run.sh setup`,
# or PYTHON=... naming an interpreter that has them): the kernel and model tests (compiled kernels; bf16
# at the ViT-B/H shapes under the flash-attention error rule), then every bench stage at real shapes
# (ViT-B/16 and ViT-H/14, bf16, mixed DALI decoding), then the report. Installs nothing. A stage whose
# packages are missing (DALI, DeepSpeed) says "skipped" and the rest still run. Writes its history file
# to bench/history/ (commit it) and copies it, the report and the logs to $OUT (default
# /tmp/maeflow-gpu-suite). About 8 minutes on an H100; kernels/NOTES.md says how to carry the packages.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-/tmp/maeflow-gpu-suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# Every kernel and model test, not only the GPU-marked ones: on a GPU the kernels run compiled, not interpreted.
timeout 120 "$PY" -m pytest -q tests/test_kernels.py tests/test_model.py 2>&1 | tee "$OUT/gpu_tests.log"
for stage in kernels model pipeline train; do
    timeout 100 "$PY" -m bench "$stage" --device gpu --quick 2>&1 | tee "$OUT/bench_$stage.log"
done
"$PY" -m bench report
cp bench/history/*gpu*.json bench/REPORT.md "$OUT/" 2>/dev/null
tail -n 40 bench/REPORT.md
