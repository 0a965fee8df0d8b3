"""End-to-end training throughput with the real trainer (`deepspeed train/pretrain.py`, one rank):
maeflow (DALI, fused kernels) against the reference-style setup (PIL DataLoader, torch reference
ops) with the same model, precision and batch. Their ratio is the epoch speedup."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.context import BenchContext, require
from bench.harness import REPO, Record, stat_of


def trainer_run(config: str, shards: Path, steps: int, log_every: int, overrides: list[str],
                env: dict[str, str]) -> list[dict]:
    """Metrics records of one single-rank training run, the first (warm-up) window dropped."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    with tempfile.TemporaryDirectory(prefix="maeflow-bench-train-") as out:
        cmd = [str(deepspeed), "--num_gpus", "1", "train/pretrain.py", "--config", config, "--data", str(shards),
               "--output", out, "--max-steps", str(steps), "--log-every", str(log_every),
               "--set", "checkpoint.every_minutes=0", "--set", "checkpoint.at_end=false",
               "--set", "log.viz_every=1000000", *overrides]
        # The CPU kernel stage turns the Triton interpreter on for this process; training must not inherit it.
        inherited = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        run_env = {**inherited, "PATH": f"{deepspeed.parent}:{os.environ['PATH']}", **env}
        proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"training run failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return records[1:]


def summarize(records: list[dict]) -> tuple:
    mfu = [r["mfu"] for r in records if r["mfu"] is not None]
    return (stat_of([r["img_per_s"] for r in records]), statistics.median(r["data_stall_pct"] for r in records),
            statistics.median(mfu) if mfu else None)


def run(ctx: BenchContext) -> list[Record]:
    require("deepspeed", "nvidia.dali", "braceexpand")
    if ctx.device == "gpu":
        shards = ctx.shards_of(ctx.imagenet_like_tree(1024 if ctx.quick else 4096), workers=os.cpu_count() or 1)
        setups = [("configs/vit_b16_1600ep.toml", 256), ("configs/vit_h14_1600ep.toml", 64)]
        steps, log_every = (30, 5) if ctx.quick else (100, 10)
    else:
        shards = ctx.shards_of(ctx.sample_tree())
        setups = [("configs/tiny.toml", 16)]
        steps, log_every = (25, 5) if ctx.quick else (60, 10)
    records = []
    for config, batch in setups:
        common = ["--set", f"optim.global_batch_size={batch}", "--set", f"optim.local_batch_size={batch}"]
        ours = trainer_run(config, shards, steps, log_every, [*common, "--set", "data.backend=dali"], {})
        base = trainer_run(config, shards, steps, log_every, [*common, "--set", "data.backend=pil"],
                           {"MAE_KERNELS": "torch"})
        (ours_rate, ours_stall, ours_mfu), (base_rate, base_stall, base_mfu) = summarize(ours), summarize(base)
        name = Path(config).stem
        records.append(Record(
            "train", f"images_per_s.{name}", "img/s", ours_rate, base_rate,
            "reference-style: PIL DataLoader + torch reference ops",
            {"config": config, "local_batch_size": batch, "ranks": 1, "steps": steps, "log_every": log_every},
            extra={"data_stall_pct": ours_stall, "mfu": ours_mfu, "baseline_data_stall_pct": base_stall,
                   "baseline_mfu": base_mfu},
        ))
    return records
