#!/usr/bin/env bash
# maeflow's entry points, each setting up .venv first:
#   bash run.sh demo   sample data -> shards -> 2-rank CPU/GPU training -> reconstruction, k-NN, fine-tuning,
#                      bench report
#   bash run.sh test   the test suite (what CI runs)
#   bash run.sh setup [--cuda|--cpu] [--offline WHEELHOUSE] [--system-torch] [--python PATH]
#                      only the .venv; the torch build for where the jobs run (default: a CUDA build where
#                      nvidia-smi sees a GPU, else the CPU one; a cluster's login node has no GPU, so name --cuda
#                      there). MAEFLOW_TORCH=cuda|cpu does the same for demo and test. --offline installs from a
#                      wheelhouse with no index (a node without network); --system-torch keeps the torch the
#                      interpreter (--python, default python3) already has and installs the rest around it.
#   bash run.sh wheels DIR [--cuda|--cpu] [--no-torch] [--python X.Y] [--driver N]
#                      on a connected machine: every wheel a node needs for `setup --offline DIR` (DeepSpeed built
#                      into one), for the nodes' Python X.Y (default: this one's) and CUDA driver N (default: this
#                      machine's, else below 580: DALI for CUDA 12); --no-torch for nodes that bring their own.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.13.0
TIMM_VERSION=1.0.29
DEEPSPEED_VERSION=0.19.8  # built into a wheel for a wheelhouse (DeepSpeed publishes sources only)
TORCH_CPU_INDEX=${MAEFLOW_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
VENV=.venv
PY=$VENV/bin/python
STAMP=$VENV/.maeflow-setup  # written last: a .venv without it is not set up (a set-up that failed part-way)

fail() { echo "error: $*" >&2; exit 2; }
has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
driver_major() {  # the CUDA driver's major version here, or nothing
    has_cuda && nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1 | cut -d. -f1 || true
}

torch_target() {  # cuda or cpu: MAEFLOW_TORCH when set, else what this machine has
    case "${MAEFLOW_TORCH:-auto}" in
        cuda|cpu) echo "$MAEFLOW_TORCH" ;;
        auto) has_cuda && echo cuda || echo cpu ;;
        *) fail "MAEFLOW_TORCH must be cuda, cpu or auto, not '$MAEFLOW_TORCH'" ;;
    esac
}

dali_extra() {  # DALI for the driver: CUDA 13's needs a 580 driver; CUDA 12's runs on 525 and later, and on CPUs
    local driver=${1:-}
    [ -n "$driver" ] && [ "$driver" -ge 580 ] && echo dali-cuda13 || echo dali-cuda12
}

wheelhouse_dali_extra() {  # the DALI a wheelhouse carries
    if compgen -G "$1/nvidia_dali_cuda130-*.whl" >/dev/null; then echo dali-cuda13
    elif compgen -G "$1/nvidia_dali_cuda120-*.whl" >/dev/null; then echo dali-cuda12
    fi
}

pip_install() {  # pip install into .venv, from the wheelhouse alone when offline
    if [ -n "$OFFLINE" ]; then
        "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$OFFLINE" "$@"
    else
        "$PY" -m pip install -q "$@"
    fi
}

make_venv() {  # .venv from BASE; with --system-torch it sees BASE's packages, BASE being a venv itself or not
    local wanted=false current
    [ "$SYSTEM_TORCH" = 1 ] && wanted=true
    current=$(sed -n 's/^include-system-site-packages *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null || true)
    if [ -x "$PY" ] && [ "$current" = "$wanted" ] && [ "$(cat "$VENV/.maeflow-base" 2>/dev/null)" = "$BASE" ]; then
        return
    fi
    rm -rf "$VENV"
    if [ "$SYSTEM_TORCH" = 1 ]; then
        "$BASE" -m venv --system-site-packages "$VENV"
        # A venv sees its base interpreter's own site-packages only: where BASE is itself a venv (some containers
        # ship one), its packages are reached through a .pth file, after .venv's own.
        local site base_sites
        site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        base_sites=$("$BASE" -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() if p))')
        echo "$base_sites" > "$site/maeflow-base-interpreter.pth"
    else
        "$BASE" -m venv "$VENV"
    fi
    echo "$BASE" > "$VENV/.maeflow-base"
}

check_system_torch() {  # the interpreter's torch: present, recent enough, and a CUDA build where GPUs are allocated
    local found version cuda minimum
    minimum=$(grep -o '"torch>=[0-9.]*"' pyproject.toml | tr -dc '0-9.')
    found=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda or "none")' 2>/dev/null) \
        || fail "--system-torch: $BASE has no torch to keep (install one in it, or drop --system-torch)"
    read -r version cuda <<<"$found"
    [ "$(printf '%s\n%s\n' "$minimum" "$version" | sort -V | head -n 1)" = "$minimum" ] \
        || fail "--system-torch: $BASE has torch $version, and maeflow needs torch >= $minimum"
    if [ "$cuda" = none ] && { [ "$1" = cuda ] || has_cuda || [ -n "${SLURM_JOB_GPUS:-}${SLURM_STEP_GPUS:-}" ]; }; then
        fail "--system-torch: $BASE has torch $version, a CPU build, and the jobs here get GPUs: use an interpreter" \
             "with a CUDA build of torch, or drop --system-torch to install the wheelhouse's"
    fi
    echo "[setup] keeping $BASE's torch $version (CUDA $cuda)"
}

project_hash() { cat pyproject.toml run.sh | sha256sum | cut -c1-16; }

ensure_setup() {  # demo and test: .venv set up as it was last time (the stamp keeps how), MAEFLOW_TORCH aside
    if [ -f "$STAMP" ]; then
        local chosen=${MAEFLOW_TORCH:-} previous
        read -ra previous <<<"$(sed -n 2p "$STAMP")"
        parse_setup "${previous[@]}"
        [ -z "$chosen" ] || MAEFLOW_TORCH=$chosen
    fi
    setup
}

setup() {
    local target want extra
    target=$(torch_target) || exit 2
    command -v "$BASE" >/dev/null 2>&1 || fail "--python $BASE: no such interpreter"
    local system=""
    [ "$SYSTEM_TORCH" = 0 ] || system=" --system-torch"
    want="$(project_hash)
--$target${OFFLINE:+ --offline $OFFLINE}$system --python $BASE"
    if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then return; fi
    echo "[setup] installing into $VENV ($target torch$( [ -z "${MAEFLOW_TORCH:-}" ] && echo ', from this machine: --cuda or --cpu to choose')$( [ -n "$OFFLINE" ] && echo ", from $OFFLINE without an index"))"
    make_venv
    rm -f "$STAMP"
    if [ "$SYSTEM_TORCH" = 1 ]; then
        check_system_torch "$target"
    elif [ -n "$OFFLINE" ]; then
        compgen -G "$OFFLINE/torch-*.whl" >/dev/null \
            || fail "the wheelhouse $OFFLINE has no torch (made with --no-torch): add --system-torch to keep this node's"
        pip_install "torch==$TORCH_VERSION"
    else
        "$PY" -m pip install -q --upgrade pip
        if [ "$target" = cuda ]; then
            pip_install "torch==$TORCH_VERSION"
        else
            # The plain PyPI wheel is the multi-GB CUDA build; the CPU one lives on PyTorch's own index.
            pip_install "torch==$TORCH_VERSION+cpu" --extra-index-url "$TORCH_CPU_INDEX" --retries 1 --timeout 10
        fi
    fi
    if [ -n "$OFFLINE" ]; then
        extra=$(wheelhouse_dali_extra "$OFFLINE")
        [ -n "$extra" ] || echo "[setup] the wheelhouse has no DALI: the loader will use its PIL backend"
    else
        extra=$(dali_extra "$( [ "$target" = cuda ] && driver_major)")
    fi
    pip_install -e ".[test${extra:+,$extra}]"
    # timm supplies the fine-tuning baseline's augmentations (pipeline/timm_ops.py); its own requirements would
    # pull a torchvision built for another torch, so it comes without them.
    pip_install --no-deps "timm==$TIMM_VERSION"
    echo "$want" > "$STAMP"
}

wheels() {
    local dir=${1:-} target=cpu torch=1 python driver site
    [ -n "$dir" ] && [ "${dir#-}" = "$dir" ] || fail "usage: bash run.sh wheels DIR [--cuda|--cpu] [--no-torch] [--python X.Y] [--driver N]"
    shift
    python=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    driver=$(driver_major)
    while [ $# -gt 0 ]; do
        case "$1" in
            --cuda) target=cuda ;;
            --cpu) target=cpu ;;
            --no-torch) torch=0 ;;
            --python) python=${2:?--python X.Y}; shift ;;
            --driver) driver=${2:?--driver N}; shift ;;
            *) fail "wheels: unknown option $1" ;;
        esac
        shift
    done
    mkdir -p "$dir"
    # Wheels only, for the nodes' Python on x86-64 Linux: nothing is built on a node without network.
    site=(--only-binary=:all: --python-version "$python" --implementation cp --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
          --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
    echo "[wheels] into $dir: Python $python, $( [ $torch = 1 ] && echo "$target torch $TORCH_VERSION" || echo 'no torch'), $(dali_extra "$driver")"
    python3 -m pip wheel -q --no-deps -w "$dir" "deepspeed==$DEEPSPEED_VERSION"  # pure Python: its ops build at run time
    # What the nodes install: maeflow's requirements, and setuptools, which builds maeflow's own editable install.
    { python3 install/wheelhouse.py requirements --extras "test,$(dali_extra "$driver")" \
          --torch "$( [ "$target" = cuda ] && echo "torch==$TORCH_VERSION" || echo "torch==$TORCH_VERSION+cpu")"
      echo "setuptools>=68"; } > "$dir/requirements.txt"
    local index=()  # the CPU build of torch lives on PyTorch's own index (its +cpu would win over PyPI's CUDA build)
    [ "$target" = cuda ] || index=(--extra-index-url "$TORCH_CPU_INDEX" --retries 1 --timeout 10)
    python3 -m pip download -q -d "$dir" --find-links "$dir" "${site[@]}" "${index[@]}" -r "$dir/requirements.txt"
    python3 -m pip download -q -d "$dir" --no-deps "${site[@]}" "timm==$TIMM_VERSION"
    [ "$torch" = 1 ] || python3 install/wheelhouse.py prune "$dir/requirements.txt" --python "$python" --without torch
    echo "[wheels] $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1): copy $dir to the nodes, then" \
         "bash run.sh setup --offline $dir$( [ $torch = 0 ] && echo ' --system-torch')"
}

demo() {
    local data=${MAEFLOW_DEMO_DIR:-demo}
    local ranks=2 devices
    "$PY" -m pipeline.sample_data "$data/images"
    "$PY" -m pipeline.build_shards "$data/images/train" "$data/shards" --split train --shard-size-mb 2 --workers 2
    "$PY" -m pipeline.build_shards "$data/images/val" "$data/shards" --split val --shard-size-mb 2 --workers 2 \
        --classes "$data/shards/train.json"
    rm -rf "$data/run" "$data/finetune"  # the demo starts over; a real run would pass --resume
    # The deepspeed launcher ignores CUDA_VISIBLE_DEVICES when told --num_gpus: --include keeps the user's GPUs.
    devices=(--num_gpus "$ranks")
    if has_cuda && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        devices=(--include "localhost:$(echo "$CUDA_VISIBLE_DEVICES" | cut -d, -f1-"$ranks")")
    fi
    # A free port, so that the demo never meets another run on this machine at DeepSpeed's default 29500.
    local port
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/deepspeed" "${devices[@]}" --master_port "$port" train/pretrain.py \
        --config configs/tiny.toml --data "$data/shards" --output "$data/run" --max-steps 30 --log-every 5
    # Fine-tuning the pre-trained encoder for two epochs, top-1 on the val split after each.
    PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/deepspeed" "${devices[@]}" --master_port "$port" train/finetune.py \
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

OFFLINE="" SYSTEM_TORCH=0 BASE=python3
parse_setup() {  # setup's options, for setup itself and for demo and test (which take none)
    while [ $# -gt 0 ]; do
        case "$1" in
            --cuda) MAEFLOW_TORCH=cuda ;;
            --cpu) MAEFLOW_TORCH=cpu ;;
            --offline) OFFLINE=$(cd "${2:?--offline WHEELHOUSE}" 2>/dev/null && pwd) || fail "--offline $2: no such folder"
                       shift ;;
            --system-torch) SYSTEM_TORCH=1 ;;
            --python) BASE=${2:?--python PATH}; shift ;;
            *) fail "usage: bash run.sh setup [--cuda|--cpu] [--offline WHEELHOUSE] [--system-torch] [--python PATH]" ;;
        esac
        shift
    done
}

case "${1:-}" in
    demo) ensure_setup; demo ;;
    test) shift; ensure_setup; run_tests "$@" ;;
    setup) shift; parse_setup "$@"; setup ;;
    wheels) shift; wheels "$@" ;;
    *) fail "usage: bash run.sh {demo|test [pytest args]|setup [options]|wheels DIR [options]}" ;;
esac
