"""What a rank pays for the size of the data set, simulated where the data cannot exist on the
machine: the epoch plan at 1.28 M, 14 M, 100 M and 2 B samples over 512 ranks (time and peak memory,
against ordering the whole epoch where that fits), and a rank's start-up over 100,000 shards
(manifest, shard sizes, plan, and reading its share's indexes), on real index files.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.context import BenchContext
from bench.harness import Record, stat_of
from pipeline.epoch_plan import EpochPlan, whole_epoch_order
from pipeline.formats import VERSIONS
from pipeline.loader_state import ReadPosition, Segment
from pipeline.manifest import Manifest, ShardRecord
from pipeline.wds_format import index_text

RANKS = 512
SAMPLES_PER_SHARD = 10_000  # img2dataset's default shard; ImageNet in 1 GiB shards has ~9,500
DATA_SETS = {
    "imagenet_1k": 1_281_167,
    "imagenet_21k": 14_197_122,
    "web_100m": 100_000_000,
    "web_2b": 2_000_000_000,
}
# the whole epoch's order is measured up to here (800 MB); beyond, 8 bytes/sample
WHOLE_ORDER_UP_TO = 100_000_000


def measured(work: Callable[[], Any], repeats: int) -> tuple[list[float], float]:
    """(seconds of each call, peak bytes allocated in one more call): timed without tracemalloc,
    which slows every allocation it traces several times over."""
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - began)
    tracemalloc.start()
    work()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak


def shard_sizes(samples: int) -> np.ndarray:
    sizes = np.full(-(-samples // SAMPLES_PER_SHARD), SAMPLES_PER_SHARD, dtype=np.int64)
    sizes[-1] = samples - SAMPLES_PER_SHARD * (len(sizes) - 1)
    return sizes


def plan_records(ctx: BenchContext) -> Iterator[Record]:
    """The last rank's plan of epoch 3 of each data set, straight and after a hand-over from 256
    ranks."""
    repeats = 3 if ctx.quick else 5
    for name, samples in DATA_SETS.items():
        sizes = shard_sizes(samples)
        plan = EpochPlan(sizes, 0, True)
        handed = ReadPosition(3, 0, (Segment(256, 128, samples // 256 // 128 // 3),))
        for how, position in (("", ReadPosition(3)), ("_handed_over", handed)):
            seconds, peak = measured(
                lambda p=position, plan=plan: plan.rank_samples(p, RANKS - 1, RANKS, 128), repeats
            )
            extra = {"plan_ms": 1e3 * float(np.median(seconds)), "peak_mb": peak / 2**20,
                     "share_samples": samples // RANKS, "whole_epoch_order_mb": 8 * samples / 2**20}
            baseline = None
            if not how and samples <= (
                WHOLE_ORDER_UP_TO if not ctx.quick else DATA_SETS["imagenet_21k"]
            ):
                whole, whole_peak = measured(lambda sizes=sizes: whole_epoch_order(sizes, 0, 3), 1)
                baseline = stat_of([1 / s for s in whole])
                extra |= {
                    "whole_epoch_order_ms": 1e3 * whole[0],
                    "whole_epoch_order_peak_mb": whole_peak / 2**20,
                }
            yield Record(
                "pipeline",
                f"rank_plan_{name}{how}",
                "plans/s",
                stat_of([1 / s for s in seconds]),
                baseline,
                "ordering the whole epoch on every rank" if baseline else "",
                {
                    "samples": samples,
                    "shards": len(sizes),
                    "ranks": RANKS,
                    "rank": RANKS - 1,
                    "local_batch_size": 128,
                },
                extra=extra,
            )


def many_shards(ctx: BenchContext, shards: int, per_shard: int) -> Path:
    """A split of `shards` shards of `per_shard` samples each: real index files and manifest, empty
    tars (start-up reads no image). Built once, cached."""
    # named by the manifest's format: a cache from a maeflow that wrote another is not read
    folder = ctx.work / f"index_only_{shards}x{per_shard}_manifest{VERSIONS['manifest']}"
    done = folder / ".done"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for shard in range(shards):
        name = f"train-{shard:06d}"
        entries = []
        for i in range(per_shard):
            key, offset = f"{shard:06d}{i:05d}", 1024 + 2048 * i
            entries += [(key, "cls", offset - 512, 1), (key, "jpg", offset, 1000)]
        (folder / f"{name}.idx").write_text(index_text(entries))
        (folder / f"{name}.tar").touch()
        records.append(ShardRecord(f"{name}.tar", per_shard, 0, f"{shard:064x}"))
    manifest = Manifest("train", shards * per_shard, [], records, plan="index-only bench split")
    Manifest.path(folder, "train").write_text(manifest.to_json())
    done.touch()
    return folder


def startup_records(ctx: BenchContext) -> Iterator[Record]:
    """Rank 511's start-up on 100,000 shards (10,000 in quick mode): a loader built, its epoch
    planned and its share's index lines made, as the DALI backend writes them."""
    from pipeline import build_loader

    shards, per_shard = (10_000, 20) if ctx.quick else (100_000, 20)
    folder = many_shards(ctx, shards, per_shard)

    def start() -> None:
        loader = build_loader(
            folder,
            local_batch_size=4,
            img_size=16,
            rank=RANKS - 1,
            world_size=RANKS,
            device="cpu",
            backend="pil",
            num_threads=1,
        )
        loader.table.entries(loader.samples()).index_lines()

    seconds, peak = measured(start, 2 if ctx.quick else 3)
    yield Record(
        "pipeline",
        f"rank_startup_{shards}_shards",
        "starts/s",
        stat_of([1 / s for s in seconds]),
        config={
            "shards": shards,
            "samples_per_shard": per_shard,
            "ranks": RANKS,
            "rank": RANKS - 1,
        },
        extra={"startup_s": float(np.median(seconds)), "peak_mb": peak / 2**20},
    )
