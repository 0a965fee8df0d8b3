#!/usr/bin/env bash
# maeflow's two entry points, each setting up .venv first:
#   bash run.sh demo   sample data -> shards -> 2-rank CPU/GPU training -> reconstruction, k-NN, fine-tuning,
#                      bench report
#   bash run.sh test   the test suite (what CI runs)
#   bash run.sh setup [--cuda|--cpu]   only the .venv; the torch build for where the jobs run (default: a CUDA
#                      build where nvidia-smi sees a GPU, else the CPU one; a cluster's login node has no GPU, so
#                      name --cuda there). MAEFLOW_TORCH=cuda|cpu does the same for demo and test.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.13.0
TIMM_VERSION=1.0.29
TORCH_CPU_INDEX=${MAEFLOW_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
VENV=.venv
PY=$VENV/bin/python

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

torch_target() {  # cuda or cpu: MAEFLOW_TORCH when set, else what this machine has
    case "${MAEFLOW_TORCH:-auto}" in
        cuda|cpu) echo "$MAEFLOW_TORCH" ;;
        auto) has_cuda && echo cuda || echo cpu ;;
        *) echo "MAEFLOW_TORCH must be cuda, cpu or auto, not '$MAEFLOW_TORCH'" >&2; exit 2 ;;
    esac
}

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    local stamp="$VENV/.maeflow-setup" want target
    target=$(torch_target) || exit 2
    want="$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)-$target"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return; fi
    echo "[setup] installing into $VENV ($target torch$( [ -z "${MAEFLOW_TORCH:-}" ] && echo ', from this machine: --cuda or --cpu to choose'))"
    "$PY" -m pip install -q --upgrade pip
    if [ "$target" = cuda ]; then
        "$PY" -m pip install -q "torch==$TORCH_VERSION"
    else
        # The plain PyPI wheel is the multi-GB CUDA build; the CPU one lives on PyTorch's own index.
        "$PY" -m pip install -q "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX" --retries 1 --timeout 10
    fi
    "$PY" -m pip install -q -e ".[test]"
    # timm supplies the fine-tuning baseline's augmentations (pipeline/timm_ops.py); its own requirements would
    # pull a torchvision built for another torch, so it comes without them.
    "$PY" -m pip install -q --no-deps "timm==$TIMM_VERSION"
    echo "$want" > "$stamp"
}

demo() {
    local data=${MAEFLOW_DEMO_DIR:-demo}
    local ranks=2
    "$PY" -m pipeline.sample_data "$data/images"
    "$PY" -m pipeline.build_shards "$data/images/train" "$data/shards" --split train --shard-size-mb 2 --workers 2
    "$PY" -m pipeline.build_shards "$data/images/val" "$data/shards" --split val --shard-size-mb 2 --workers 2 \
        --classes "$data/shards/train.json"
    rm -rf "$data/run" "$data/finetune"  # the demo starts over; a real run would pass --resume
    # A free port, so that the demo never meets another run on this machine at DeepSpeed's default 29500.
    local port
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/deepspeed" --num_gpus "$ranks" --master_port "$port" train/pretrain.py \
        --config configs/tiny.toml --data "$data/shards" --output "$data/run" --max-steps 30 --log-every 5
    # Fine-tuning the pre-trained encoder for two epochs, top-1 on the val split after each.
    PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/deepspeed" --num_gpus "$ranks" --master_port "$port" train/finetune.py \
        --config configs/finetune_tiny.toml --data "$data/shards" --output "$data/finetune" --max-steps 24 \
        --set model.init="$data/run"
    "$PY" -m bench train --quick --out "$data/bench"
    "$PY" -m bench report --history "$data/bench" --out "$data/bench"
    echo
    echo "demo done:"
    echo "  shards          $data/shards"
    echo "  metrics         $data/run/metrics.jsonl"
    echo "  reconstruction  $(ls "$data"/run/viz/*.png | tail -n 1)"
    echo "  k-NN top-1      $("$PY" -c 'import json, sys
r = [json.loads(line) for line in open(sys.argv[1]) if "knn_top1_cls" in line][-1]
patch, cls = 100 * r["knn_top1_patch_mean"], 100 * r["knn_top1_cls"]
print(f"{patch:.1f}% (mean patch token), {cls:.1f}% (cls token); chance is 12.5%")' "$data/run/metrics.jsonl")"
    echo "  fine-tuned      $("$PY" -c 'import json, sys
r = [json.loads(line) for line in open(sys.argv[1]) if "top1" in line][-1]
top1, epochs = 100 * r["top1"], r["epoch"]
print(f"top-1 {top1:.1f}% after {epochs} epochs (chance 12.5%); best weights in {sys.argv[2]}")' \
        "$data/finetune/metrics.jsonl" "$data/finetune/best.pth")"
    echo "  bench report    $data/bench/REPORT.md"
}

run_tests() {
    "$PY" -m pytest "$@"
}

case "${1:-}" in
    demo) setup; demo ;;
    test) shift; setup; run_tests "$@" ;;
    setup)
        case "${2:-}" in
            --cuda) MAEFLOW_TORCH=cuda ;;
            --cpu) MAEFLOW_TORCH=cpu ;;
            "") ;;
            *) echo "usage: bash run.sh setup [--cuda|--cpu]" >&2; exit 2 ;;
        esac
        setup ;;
    *) echo "usage: bash run.sh {demo|test [pytest args]|setup [--cuda|--cpu]}" >&2; exit 2 ;;
esac
