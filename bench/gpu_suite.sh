#!/usr/bin/env bash
# The whole-system GPU measurement, in one prepared run:
#   bash bench/gpu_suite.sh             on a CUDA machine with maeflow's packages (`bash run.sh setup`, or
#                                       PYTHON=... naming an interpreter that has them)
#   bash bench/gpu_suite.sh --dry-run   the same stages, in the same order, with the same outputs, at tiny
#                                       shapes on the CPU: what CI runs, so that a typo fails there, not on a GPU
# Stages, each cut at its budget (the rest still run): the kernel and model tests (compiled kernels, bf16 at the
# ViT-B/H shapes), then bench kernels, model, train (the trainer on synthetic data first: DeepSpeed alone, with a
# profile per preset), pipeline, finetune (the fine-tuning step and data path) and report. A stage whose packages are missing (DALI, DeepSpeed) says "skipped"
# and the others run. Exits 1 if any stage failed or was cut. Planned at about 8 minutes on one H200; with
# packages installed from local wheels (kernels/NOTES.md, "a node without network") within 9.
# Outputs in $OUT (default /tmp/maeflow-gpu-suite), at most 8 files of at most 16 MB: suite.txt (the machine and
# every stage's status, time and budget), logs.tar.gz, the history file and its profiles, REPORT.md. The
# history file is also appended under bench/history/ (commit it, with the report).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-/tmp/maeflow-gpu-suite}
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
rm -rf "$OUT" && mkdir -p "$OUT/logs"
if [ "$DRY" = 1 ]; then  # nothing of a dry run lands in the project's history or report
    DEVICE=cpu HISTORY="$OUT/history" REPORT="$OUT/report" QUICK=--quick
    TESTS=(tests/test_kernels.py tests/test_model.py -m "not slow")
else
    DEVICE=gpu HISTORY=bench/history REPORT=bench QUICK=--quick
    TESTS=(tests/test_kernels.py tests/test_model.py)
fi
began=$(date +%s)
status=0
summary="$OUT/suite.txt"
{
    echo "maeflow gpu suite $( [ "$DRY" = 1 ] && echo '(dry run on the CPU)'), commit $(git rev-parse --short HEAD 2>/dev/null)"
    if [ "$DRY" = 1 ]; then echo "device: cpu ($(nproc) cores)"; else
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; fi
} > "$summary"

stage() {  # stage NAME BUDGET_S COMMAND...: run it cut at its budget, log it, time it
    local name=$1 budget=$2 start code state
    shift 2
    start=$(date +%s)
    timeout --kill-after 10 "$budget" "$@" > "$OUT/logs/$name.log" 2>&1
    code=$?
    case $code in
        0) state=ok ;;
        124|137) state="CUT at its budget"; status=1 ;;
        *) state="FAILED (exit $code)"; status=1 ;;
    esac
    grep -q "skipped (" "$OUT/logs/$name.log" && [ "$code" = 0 ] && state="ok ($(grep -o 'skipped (.*' "$OUT/logs/$name.log" | head -n 1))"
    printf '%-9s %4d s of %4d s  %s\n' "$name" "$(( $(date +%s) - start ))" "$budget" "$state" | tee -a "$summary"
}

stage tests    100 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
stage kernels   50 "$PY" -m bench kernels --device "$DEVICE" $QUICK --out "$HISTORY"
stage model     50 "$PY" -m bench model --device "$DEVICE" $QUICK --out "$HISTORY"
stage train    150 "$PY" -m bench train --device "$DEVICE" $QUICK --out "$HISTORY"
stage pipeline  80 "$PY" -m bench pipeline --device "$DEVICE" $QUICK --out "$HISTORY"
stage finetune  80 "$PY" -m bench finetune --device "$DEVICE" $QUICK --out "$HISTORY"
stage report    20 "$PY" -m bench report --history "$HISTORY" --out "$REPORT"
echo "total     $(( $(date +%s) - began )) s" | tee -a "$summary"

# What comes back: the summary, the logs in one archive, this run's history and profiles, the report.
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
sha=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
for file in "$HISTORY"/*"$sha"*; do
    [ -f "$file" ] && cp "$file" "$OUT/"
done
cp "$REPORT/REPORT.md" "$OUT/" 2>/dev/null
rm -rf "$OUT/history" "$OUT/report"
files=$(find "$OUT" -type f | wc -l)
big=$(find "$OUT" -type f -size +16M | wc -l)
echo "outputs: $files files in $OUT$( [ "$big" -gt 0 ] && echo ", $big over 16 MB")" | tee -a "$summary"
[ "$files" -le 8 ] && [ "$big" -eq 0 ] || status=1
exit "$status"
