"""Data path: DALI (mixed on GPU, CPU here) against the PIL/DataLoader baseline, images/s at 224."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bench.context import BenchContext, require
from bench.harness import Record, Stat, rate, time_repeats


def epoch_rate(shards: Path, backend: str, ctx: BenchContext, threads: int, batch: int, repeats: int) -> Stat:
    from pipeline import build_loader  # after run()'s check: it needs braceexpand

    loader = build_loader(shards, local_batch_size=batch, img_size=224, backend=backend, device=ctx.device,
                          num_threads=threads)
    state = {"epoch": 0}

    def one_epoch() -> None:
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        batches = sum(1 for _ in loader)
        if ctx.device == "gpu":
            torch.cuda.synchronize()
        assert batches == len(loader)

    return rate(len(loader) * batch, time_repeats(one_epoch, repeats, warmup=1))


def run(ctx: BenchContext) -> list[Record]:
    require("nvidia.dali", "braceexpand")
    if ctx.device == "gpu":
        tree = ctx.imagenet_like_tree(1024 if ctx.quick else 4096)
        dali_threads, pil_workers, batch = 8, 16, 256
    else:
        tree = ctx.imagenet_like_tree(384 if ctx.quick else 1024)
        dali_threads = pil_workers = os.cpu_count() or 1
        batch = 32
    shards = ctx.shards_of(tree, workers=os.cpu_count() or 1)
    repeats = 2 if ctx.quick else 5
    dali = epoch_rate(shards, "dali", ctx, dali_threads, batch, repeats)
    pil = epoch_rate(shards, "pil", ctx, pil_workers, batch, repeats)
    jpeg_kb = sum(p.stat().st_size for p in tree.rglob("*.JPEG")) / max(1, len(list(tree.rglob("*.JPEG")))) / 1024
    config = {"img_size": 224, "batch": batch, "dali_threads": dali_threads, "pil_workers": pil_workers,
              "decode": "mixed (nvJPEG + HW decoder)" if ctx.device == "gpu" else "cpu",
              "mean_jpeg_kb": round(jpeg_kb, 1), "train_augmentation": "random resized crop + flip"}
    return [Record("pipeline", "train_images_per_s", "img/s", dali, pil, "PIL + DataLoader workers", config)]
