"""Real training runs for the tests: the tiny preset on real shards, launched as a user launches
it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from pipeline.build_shards import main as build_shards
from pipeline.sample_data import main as sample_data
from tests.helpers import REPO, start_job
from train.distributed import free_port

DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def make_sample_shards(
    root: Path, classes: int = 4, train_per_class: int = 16, val_per_class: int = 2
) -> Path:
    """Sample photos in `classes` classes built into train and val shards under root/shards."""
    sample_data(
        [
            str(root / "images"),
            "--classes",
            str(classes),
            "--train-per-class",
            str(train_per_class),
            "--val-per-class",
            str(val_per_class),
        ]
    )
    for split in ("train", "val"):
        extra = ["--classes", str(root / "shards" / "train.json")] if split == "val" else []
        assert build_shards([str(root / "images" / split), str(root / "shards"), "--split", split,
                             "--shard-size-mb", "0.5", "--workers", "1", "--quiet", *extra]) == 0
    return root / "shards"


def launch(
    shards: Path,
    output: Path,
    *extra: str,
    ranks: int = 2,
    script: str = "train/pretrain.py",
    config: str = "configs/tiny.toml",
    env: dict[str, str] | None = None,
    launcher: str = "ranks",
) -> subprocess.Popen:
    """A training job: its ranks started directly (`launcher` "ranks", as srun starts tasks), or
    through the `deepspeed` launcher, as the README's command does (which costs each launch about 8
    s more on 2 cores)."""
    args = [script, "--config", config, "--data", str(shards), "--output", str(output), *extra]
    if launcher == "deepspeed":
        cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]
    else:
        cmd = [
            "bash",
            str(REPO / "tests" / "scripts" / "start_ranks.sh"),
            str(ranks),
            str(free_port()),
            sys.executable,
            *args,
        ]
    env = dict(os.environ, PATH=f"{DEEPSPEED.parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(output.parent / "torch_extensions"), **(env or {}))
    return start_job(cmd, cwd=REPO, env=env)


def run(
    shards: Path,
    output: Path,
    *extra: str,
    ranks: int = 2,
    expect: int = 0,
    script: str = "train/pretrain.py",
    config: str = "configs/tiny.toml",
    env: dict[str, str] | None = None,
    launcher: str = "ranks",
) -> str:
    proc = launch(
        shards,
        output,
        *extra,
        ranks=ranks,
        script=script,
        config=config,
        env=env,
        launcher=launcher,
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect, out[-4000:]
    return out


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def metrics(output: Path) -> list[dict]:
    """The training records of metrics.jsonl (k-NN evaluations and events are in it too)."""
    return [r for r in records(output) if "loss" in r]


def knn_records(output: Path) -> list[dict]:
    return [r for r in records(output) if "knn_top1_cls" in r]


def events(output: Path, kind: str) -> list[dict]:
    """metrics.jsonl's event records of one kind ("resumed")."""
    return [r for r in records(output) if r.get("event") == kind]


def samples_read(output: Path, steps: range) -> list[str]:
    """Keys of the samples every rank read in the optimizer steps `steps` (from log.sample_ids)."""
    keys = []
    for path in sorted((output / "samples").glob("rank*.txt")):
        for line in path.read_text().splitlines():
            step, *batch = line.split()
            if int(step) in steps:
                keys += batch
    return keys


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What srun's variables become in a task: every rank its own process, one per node here."""
    return dict(
        os.environ,
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )


def fake_slurm(folder: Path, tasks: int) -> dict[str, str]:
    """srun and scontrol as a one-node allocation runs them: srun starts `tasks` copies with SLURM's
    task variables and returns the highest status; scontrol names this host and records a
    requeue."""
    folder.mkdir()
    scripts = {
        "srun": f"""#!/usr/bin/env bash
# srun's own options
while [ "${{1#-}}" != "$1" ]; do echo "$1" >> {folder}/srun_options; shift; done
pids=()
for task in $(seq 0 {tasks - 1}); do
    SLURM_PROCID=$task SLURM_LOCALID=$task "$@" &
    pids+=($!)
done
worst=0
for pid in "${{pids[@]}}"; do wait "$pid"; code=$?; [ $code -gt $worst ] && worst=$code; done
exit $worst
""",
        "scontrol": f"""#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") echo 127.0.0.1 ;;
    requeue*) echo "$2" >> {folder}/requeued ;;
esac
""",
    }
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod((folder / name).stat().st_mode | stat.S_IEXEC)
    return {
        "PATH": f"{folder}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks),
        "SLURM_CPUS_PER_TASK": "1",
        "MASTER_PORT": str(free_port()),
        "MAEFLOW_PYTHON": sys.executable,
    }
