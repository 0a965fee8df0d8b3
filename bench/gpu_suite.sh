#!/usr/bin/env bash
# The whole-system GPU measurement, in one prepared run:
#   bash bench/gpu_suite.sh             on a CUDA machine with maeflow's packages: a .venv set up by `bash run.sh
#                                       setup` (on a node without network: `bash run.sh setup --offline WHEELHOUSE
#                                       [--system-torch]`), or PYTHON=... naming an interpreter that has them
#   bash bench/gpu_suite.sh --dry-run   the same stages, in the same order, with the same outputs, at tiny
#                                       shapes on the CPU, so that a typo fails there, not on a GPU: run it, or
#                                       MAEFLOW_SUITE_DRY_RUN=1 bash run.sh test tests/test_gpu_suite.py, before
#                                       every GPU run (CI runs only the script's skeleton: its minutes are too many)
# Stages, the records that matter most first, each cut at its budget (the rest still run): the node's preflight
# (Triton's compiler and launcher, DALI's GPU decoding, the packages: `python -m train.preflight`), the trainer on synthetic
# data against its bare step with MFU (ViT-H, then ViT-B; DeepSpeed alone), bench kernels, bench model, the kernel
# and model tests on the GPU (compiled kernels, bf16 at the ViT-B/H shapes), the loader (pipeline), fine-tuning,
# the trainer on shards against the reference-style trainer, and the report. A stage whose packages are missing
# (DALI, DeepSpeed) says "skipped" and the others run. Exits 1 if any stage failed or was cut.
# Budgets, estimated from the work each does (no GPU run has measured them yet; each stage's time is in suite.txt,
# to set them from): preflight (a Triton launcher build, a DALI pipeline) ~20 s; train 2 presets x (bare step:
# compile ~45 s + 13 steps; trainer: start-up ~15 s, compile ~45 s, 20 steps) ~ 220 s; kernels 6 cases x (an
# inductor compile ~15 s + 3 variants x 20 wall and 20 profiled repeats in one profiler session) + the copy ~100 s;
# model ~30 s; tests ~50 s; pipeline (10,240 JPEGs generated and sharded on 16 cores, 3 epochs of DALI and PIL)
# ~60 s; finetune 2 presets x (a compiled bare step ~50 s, a launched trainer ~70 s) + the data path ~30 s ~ 270 s.
# Then train_shards (2 trainers on shards, 2 reference-style runs, ~200 s) and the report: a window that ends before
# them loses nothing measured before (the report is rebuilt from the history anywhere).
# Outputs in $OUT (default /tmp/maeflow-gpu-suite), never deleted, at most 8 files of at most 16 MB, each written as
# soon as it exists: suite.txt (the machine and every stage's status, time and budget, appended), suite.log (every
# stage's output, appended), the history file with every record the moment it is measured and its profiles,
# REPORT.md. On a GPU the history file is kept under bench/history/ as well (commit it, with the report).
set -uo pipefail
cd "$(dirname "$0")/.."
# .venv only once its set-up finished (run.sh writes the stamp last): a set-up that failed part-way, say for want
# of network, leaves a .venv without maeflow's packages.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -f .venv/.maeflow-setup ]; then PY=.venv/bin/python
    else
        echo "no set-up .venv here: run bash run.sh setup (on a node without network: bash run.sh setup --offline" \
             "WHEELHOUSE [--system-torch]), or set PYTHON to an interpreter with maeflow's packages" >&2
        exit 2
    fi
fi
OUT=${OUT:-/tmp/maeflow-gpu-suite}
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
SCALE=1  # the budgets are a GPU's; a dry run's tiny shapes on 2 CPU cores get three times as long
if [ "$DRY" = 1 ]; then  # nothing of a dry run lands in the project's history or report
    SCALE=3 DEVICE=cpu DTYPE=float32 HISTORY=("--out" "$OUT") REPORT=(--history "$OUT" --out "$OUT") QUICK=--quick
    TESTS=(tests/test_kernels.py tests/test_model.py -m "not slow")
else
    DEVICE=gpu DTYPE=bfloat16 HISTORY=("--out" bench/history "--mirror" "$OUT") REPORT=(--history bench/history --out bench)
    QUICK=--quick TESTS=(tests/test_kernels.py tests/test_model.py)
fi
began=$(date +%s)
status=0
summary="$OUT/suite.txt"
log="$OUT/suite.log"
{
    echo "maeflow gpu suite $( [ "$DRY" = 1 ] && echo '(dry run on the CPU)'), commit $(git rev-parse --short HEAD 2>/dev/null), $(date -u +%FT%TZ)"
    if [ "$DRY" = 1 ]; then echo "device: cpu ($(nproc) cores)"; else
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; fi
} >> "$summary"

stage() {  # stage NAME BUDGET_S COMMAND...: run it cut at its budget, its output appended to the log, timed
    local name=$1 budget=$(( $2 * SCALE )) start code state part
    shift 2
    start=$(date +%s)
    part=$(mktemp)
    echo "===== $name (budget $budget s)" >> "$log"
    timeout --kill-after 10 "$budget" "$@" 2>&1 | tee "$part" >> "$log"
    code=${PIPESTATUS[0]}
    case $code in
        0) state=ok ;;
        124|137) state="CUT at its budget"; status=1 ;;
        *) state="FAILED (exit $code)"; status=1 ;;
    esac
    grep -q "skipped (" "$part" && [ "$code" = 0 ] && state="ok ($(grep -o 'skipped (.*' "$part" | head -n 1))"
    rm -f "$part"
    printf '%-12s %4d s of %4d s  %s\n' "$name" "$(( $(date +%s) - start ))" "$budget" "$state" | tee -a "$summary"
}

stage preflight     60 "$PY" -m train.preflight --device "$DEVICE" --dtype "$DTYPE"
stage train        240 "$PY" -m bench train --device "$DEVICE" $QUICK "${HISTORY[@]}"
stage kernels      150 "$PY" -m bench kernels --device "$DEVICE" $QUICK "${HISTORY[@]}"
stage model         40 "$PY" -m bench model --device "$DEVICE" $QUICK "${HISTORY[@]}"
stage tests         60 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
stage pipeline      60 "$PY" -m bench pipeline --device "$DEVICE" $QUICK "${HISTORY[@]}"
stage finetune     300 "$PY" -m bench finetune --device "$DEVICE" $QUICK "${HISTORY[@]}"
stage train_shards 240 "$PY" -m bench train_shards --device "$DEVICE" $QUICK "${HISTORY[@]}"
stage report        20 "$PY" -m bench report "${REPORT[@]}"
[ "$DRY" = 1 ] || cp bench/REPORT.md "$OUT/" 2>/dev/null
echo "total        $(( $(date +%s) - began )) s" | tee -a "$summary"

files=$(find "$OUT" -type f | wc -l)
big=$(find "$OUT" -type f -size +16M | wc -l)
echo "outputs: $files files in $OUT$( [ "$big" -gt 0 ] && echo ", $big over 16 MB")" | tee -a "$summary"
[ "$files" -le 8 ] && [ "$big" -eq 0 ] || status=1
exit "$status"
