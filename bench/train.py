"""End-to-end training throughput, measured per preset on one device, in two stages.

`bench train`, the records that matter most, ViT-H first:
- maeflow's trainer on synthetic data (`data.backend=synthetic`: no decoding): what the trainer
costs on top of
  the model step, its MFU, peak memory and a profile (OUTPUT/profile.txt, kept beside the history
  file); this needs DeepSpeed alone, so it runs before DALI is installed;
- maeflow's bare model step: the same model, precision, optimizer and compiled blocks in a plain
loop on images
  already in memory, the ceiling the trainer is held against (trainer / bare step = the trainer's
  efficiency).

`bench train_shards`:
- maeflow's trainer: `train/pretrain.py` as one rank, DALI, fused kernels;
- the reference-style trainer (`bench/reference_trainer.py`: DDP, autocast, fused AdamW, PIL
DataLoader,
  the reference formulation of the model); trainer / reference-style = the epoch speedup.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from bench.context import BenchContext, require
from bench.harness import REPO, Record, Stat, kernels_backend, rate, stat_of, time_repeats
from model.flops import mae_train_flops, peak_flops
from train.config import load_config
from train.distributed import free_port
from train.engine import apply_model_switches, attention_backend
from train.health import RankTimes, Watchdog
from train.mae_task import mae_from_config
from train.profiling import WARMUP_STEPS
from train.recipe import build_optimizer


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    # The CPU kernel stage turns the Triton interpreter on for this process; training must not
    # inherit it.
    inherited = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**inherited, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def _metrics(cmd: list[str], out: Path, env: dict[str, str]) -> list[dict]:
    proc = subprocess.run(cmd, cwd=REPO, env=_clean_env(env), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(
            f"training run failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # not the k-NN evaluations and events beside them
    windows = [r for r in records if "img_per_s" in r]
    return windows[1:]  # the first window holds the warm-up (and any compilation)


def one_rank_run(config: str, batch: int, steps: int, log_every: int) -> dict:
    """A trainer record's config: the preset and what the one-rank run was given."""
    return {"config": config, "local_batch_size": batch, "ranks": 1, "steps": steps,
            "log_every": log_every}


def trainer_run(config: str, shards: Path | None, steps: int, log_every: int, batch: int,
                script: str = "train/pretrain.py") -> tuple[list[dict], str]:
    """Metrics windows of maeflow's trainer (`script`) on one rank, and its profile (synthetic data
    when `shards` is
    None: then the steps of the first window after the profiler's warm-up are profiled; that window
    is not counted)."""
    with tempfile.TemporaryDirectory(prefix="maeflow-bench-train-") as out:
        profiled = log_every - WARMUP_STEPS
        data = ["--data", str(shards)] if shards else ["--set", "data.backend=synthetic",
                                                      "--set", f"log.profile_steps={profiled}"]
        # One rank started as a plain process (a script without a launcher runs as one): it takes
        # the first GPU CUDA_VISIBLE_DEVICES shows, as the bare step does. `deepspeed --num_gpus 1`
        # would drop that variable and take GPU 0 of the machine, perhaps another card than the
        # baseline's.
        cmd = [
            sys.executable,
            script,
            "--config",
            config,
            *data,
            "--output",
            out,
            "--max-steps",
            str(steps),
            "--log-every",
            str(log_every),
            "--set",
            f"optim.global_batch_size={batch}",
            "--set",
            f"optim.local_batch_size={batch}",
            "--set",
            "checkpoint.every_minutes=0",
            "--set",
            "checkpoint.at_end=false",
            "--set",
            "eval.every_epochs=0",
            # a pre-training field
            *(["--set", "log.viz_every=1000000"] if script == "train/pretrain.py" else []),
        ]
        windows = _metrics(cmd, Path(out), {})
        profile = Path(out, "profile.txt")
        return windows, profile.read_text() if profile.is_file() else ""


def reference_run(config: str, shards: Path, steps: int, log_every: int, batch: int) -> list[dict]:
    """Metrics windows of the reference-style trainer on one rank."""
    with tempfile.TemporaryDirectory(prefix="maeflow-bench-reference-") as out:
        cmd = [
            sys.executable,
            "-m",
            "bench.reference_trainer",
            "--config",
            config,
            "--data",
            str(shards),
            "--output",
            out,
            "--steps",
            str(steps),
            "--log-every",
            str(log_every),
            "--local-batch-size",
            str(batch),
        ]
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
        return _metrics(cmd, Path(out), env)


def bare_step_rate(config: str, batch: int, device: str, repeats: int) -> tuple[Stat, int]:
    """img/s of forward + backward + optimizer step of the trainer's model, precision, optimizer and
    model switches (both bf16 modes timed as autocast bf16), and its FLOPs per image."""
    cfg = load_config(config)
    model = mae_from_config(cfg).to(device)
    apply_model_switches(model, cfg)  # compiled blocks and recompute, as the trainer has them
    optimizer = build_optimizer(model, cfg.optim, 1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.runtime.precision != "fp32")
    images = torch.randn(batch, 3, cfg.data.img_size, cfg.data.img_size, device=device)

    def step() -> None:
        with autocast, attention_backend(cfg.runtime.attention):
            loss, _, _ = model(images, mask_ratio=cfg.model.mask_ratio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The kernels the trainer runs: Triton on a GPU, the torch references on a CPU (where the Triton
    # interpreter a kernel stage may have switched on is for correctness, not speed).
    with kernels_backend("auto" if device == "cuda" else "torch"):
        seconds = time_repeats(
            step, repeats, warmup=3, device="cuda" if device == "cuda" else "cpu"
        )
    return rate(batch, seconds), mae_train_flops(model, cfg.model.mask_ratio)


def health_overhead(
    device: torch.device, log_every: int, repeats: int = 20_000
) -> tuple[float, dict[str, float]]:
    """Microseconds per optimizer step that run health costs the loop: the watchdog's beat and the
    per-rank forward timing every step, and the straggler gather over the CPU side-channel once per
    logged window (measured here on one rank; on many ranks it is one small all-gather per
    window)."""
    with tempfile.TemporaryDirectory(prefix="maeflow-bench-health-") as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            dog = Watchdog(3600, Path(folder), 0, lambda: 0)
            times = RankTimes(
                device, dist.group.WORLD, [socket.gethostname()], margin=0.25, windows=3
            )
            beat = statistics.median(time_repeats(dog.beat, repeats, warmup=100)) * 1e6

            def forward_block() -> None:
                with times.forward():
                    pass

            forward = statistics.median(time_repeats(forward_block, repeats, warmup=100)) * 1e6
            gather = (
                statistics.median(time_repeats(lambda: times.gather(0.0), 200, warmup=10)) * 1e6
            )
            dog.close()
        finally:
            dist.destroy_process_group()
    parts = {"watchdog_beat_us": beat, "forward_timing_us": forward, "gather_per_window_us": gather,
             "log_every": log_every}
    return beat + forward + gather / log_every, parts


def summarize(records: list[dict]) -> tuple:
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    return (
        stat_of([r["img_per_s"] for r in records]),
        statistics.median(r["data_stall_pct"] for r in records),
        statistics.median(mfu) if mfu else None,
    )


def setups(ctx: BenchContext) -> tuple[list[tuple[str, int]], int, int]:
    """(config, local batch) per preset measured, the steps of each trainer run and its log
    interval."""
    if ctx.device == "gpu":
        return [("configs/vit_h14_1600ep.toml", 128), ("configs/vit_b16_1600ep.toml", 256)], *(
            (20, 5) if ctx.quick else (100, 10))
    return [("configs/tiny.toml", 16)], *((25, 5) if ctx.quick else (60, 10))


def run(ctx: BenchContext) -> Iterator[Record]:
    """The trainer on synthetic data against its bare model step, ViT-H first; then what run health
    costs."""
    require("deepspeed", "braceexpand")
    presets, steps, log_every = setups(ctx)
    peak = peak_flops(torch.cuda.get_device_name()) if ctx.device == "gpu" else None
    step_s = None
    for config, batch in presets:
        bare, flops = bare_step_rate(
            config, batch, ctx.torch_device, 10 if ctx.device == "gpu" else 5
        )
        windows, profile = trainer_run(config, None, steps, log_every, batch)
        synthetic, _, synthetic_mfu = summarize(windows)
        memory = [r["peak_memory_gb"] for r in windows if r.get("peak_memory_gb") is not None]
        # the first preset's seconds per step on synthetic data
        step_s = step_s or batch / synthetic.median
        yield Record(
            "train",
            f"synthetic_images_per_s.{Path(config).stem}",
            "img/s",
            synthetic,
            bare,
            "bare model step (same model, precision, optimizer, compile; images in memory)",
            one_rank_run(config, batch, steps, log_every),
            extra={
                "mfu": synthetic_mfu,
                "peak_memory_gb": max(memory) if memory else None,
                "bare_step_mfu": flops * bare.median / peak if peak else None,
                "profile": profile,
            },
        )
    # the presets log every 50 steps
    per_step_us, parts = health_overhead(torch.device(ctx.torch_device), 50)
    yield Record(
        "train",
        "health_overhead_per_step",
        "us",
        Stat(per_step_us, per_step_us, per_step_us, 1),
        config={"preset_log_every": 50},
        extra={
            **parts,
            "fraction_of_step": per_step_us / 1e6 / step_s,
            "step_s": step_s,
            "step_config": presets[0][0],
        },
    )


def run_on_shards(ctx: BenchContext) -> Iterator[Record]:
    """The trainer on ImageNet-like shards against the reference-style trainer, per preset."""
    require("deepspeed", "braceexpand", "nvidia.dali")
    presets, steps, log_every = setups(ctx)
    if ctx.device == "gpu":
        shards = ctx.shards_of(ctx.imagenet_like_tree(10_240), workers=os.cpu_count() or 1)
    else:
        shards = ctx.shards_of(ctx.sample_tree())
    for config, batch in presets:
        ours, ours_stall, ours_mfu = summarize(
            trainer_run(config, shards, steps, log_every, batch)[0]
        )
        base, base_stall, base_mfu = summarize(
            reference_run(config, shards, steps, log_every, batch)
        )
        yield Record(
            "train",
            f"images_per_s.{Path(config).stem}",
            "img/s",
            ours,
            base,
            "reference-style trainer: DDP, autocast, fused AdamW, PIL DataLoader, reference "
            "formulation",
            one_rank_run(config, batch, steps, log_every),
            extra={
                "data_stall_pct": ours_stall,
                "mfu": ours_mfu,
                "baseline_data_stall_pct": base_stall,
                "baseline_mfu": base_mfu,
            },
        )
