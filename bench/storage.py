"""Shards in a bucket (`python -m bench storage`), against a local S3-compatible server
(`bench.s3_server`, moto's, in its own process) with and without a delay added to every request, as
a cloud bucket has one:

- the loader on the bucket against the same shards on local disk, in the same run; GET requests and
  bytes per image;
- at each delay, the loader's reads (each window's shards fetched whole, `pipeline.shard_stage`)
  against DALI reading the bucket's tars itself, one ranged GET per image: the design decision;
- a rank's start-up over 10,000 shards in a bucket: the listing and the manifest.

`python -m bench pipeline --data s3://bucket/prefix` measures the loader on a real bucket.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.context import BenchContext, require
from bench.data_scale import many_shards
from bench.harness import Record, Stat, stat_of
from bench.pipeline import batch_times, data_path_images, delivered_and_boundary

BUCKET = "maeflow-bench"
DELAYS_MS = (0, 20)
STARTUP_SHARDS = 10_000
SHARD_MB = 8  # several shards per rank and epoch even in quick mode, so that windows turn over


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _upload_folder(folder: Path, prefix: str) -> str:
    """Every file of `folder` under `s3://BUCKET/prefix/`, 16 at a time."""
    import boto3

    client = boto3.client("s3")
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), BUCKET, f"{prefix}/{p.name}"), files))
    return f"s3://{BUCKET}/{prefix}"


def _loader_rate(where: str, ctx: BenchContext, epochs: int, threads: int) -> tuple[Stat, int]:
    """(delivered img/s, images read) of the DALI loader over `where`, MAE's reading (no labels)."""
    from pipeline import build_loader

    batch = 256 if ctx.device == "gpu" else 32
    with build_loader(where, local_batch_size=batch, img_size=224, backend="dali",
                      device=ctx.device, num_threads=threads, labels=False,
                      dtype=torch.bfloat16 if ctx.device == "gpu" else torch.float32) as loader:
        timeline = batch_times(loader, range(epochs), ctx.device == "gpu")
    delivered, _, _ = delivered_and_boundary(timeline, batch)
    return delivered, sum(len(t) for t in timeline) * batch


def _ranged_rate(where: str, ctx: BenchContext, threads: int, batches: int) -> Stat:
    """DALI's own reader over the bucket's tars (one ranged GET per image) and local index files:
    the loader's graph driven directly, as `bench.pipeline.raw_graph_rate` drives it on disk."""
    from pipeline import build_loader
    from pipeline.dali_graph import HW_DECODER_LOAD, image_pipeline

    batch = 256 if ctx.device == "gpu" else 32
    with build_loader(where, local_batch_size=batch, img_size=224, backend="dali",
                      device=ctx.device, num_threads=threads, labels=False) as loader:
        spec = loader.spec
        indexes = [str(p) for p in (ctx.work / "storage_indexes").glob("*.idx")]
        pipe = image_pipeline(
            spec, [f"{where}/{Path(p).stem}.tar" for p in sorted(indexes)], sorted(indexes),
            HW_DECODER_LOAD, batch_size=batch, num_threads=threads,
            device_id=torch.cuda.current_device() if spec.device == "gpu" else None, seed=1,
            prefetch_queue_depth=2,
        )
        pipe.build()
        pipe.run()
        rates = []
        for _ in range(2):
            began = time.perf_counter()
            for _ in range(batches):
                pipe.run()
            if spec.device == "gpu":
                torch.cuda.synchronize()
            rates.append(batches * batch / (time.perf_counter() - began))
        del pipe
    return stat_of(rates)


def _startup(where: str, repeats: int) -> tuple[Stat, dict]:
    """Seconds a rank takes to find the split in a bucket (the listing, the manifest, the sample
    counts), as starts/s; and the requests one start makes."""
    from pipeline.manifest import resolve_shards

    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        resolve_shards(where).sample_counts()
        seconds.append(time.perf_counter() - began)
    return stat_of([1 / s for s in seconds]), {"startup_s": min(seconds)}


def run(ctx: BenchContext) -> Iterator[Record]:
    require("nvidia.dali", "braceexpand", "boto3", "moto")
    import boto3

    from bench.s3_server import local_s3

    cores = os.cpu_count() or 1
    epochs = 3 if ctx.quick else 5
    count = data_path_images(ctx)
    tree = ctx.imagenet_like_tree(count)
    shards = ctx.shards_of(tree, workers=cores, shard_size_mb=SHARD_MB)
    # the index files DALI's own reader is given beside the bucket's tars
    local_indexes = ctx.work / "storage_indexes"
    local_indexes.mkdir(exist_ok=True)
    for idx in shards.glob("*.idx"):
        (local_indexes / idx.name).write_bytes(idx.read_bytes())
    config = {"img_size": 224, "images": count, "shards": len(list(shards.glob("*.tar"))),
              "shard_mb": SHARD_MB, "epochs": epochs, "threads": cores,
              "server": "moto (bench.s3_server) on 127.0.0.1"}
    with local_s3() as server, _environment({**server.env, "AWS_MAX_ATTEMPTS": "3"}):
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        bucket = _upload_folder(shards, "shards")
        disk, _ = _loader_rate(str(shards), ctx, epochs, cores)
        for delay in DELAYS_MS:
            server.set_delay(delay)
            server.stats(reset=True)
            whole, images = _loader_rate(bucket, ctx, epochs, cores)
            served = server.stats()
            per_image = {f"{method}_per_image": n / images
                         for method, n in served["requests"].items()}
            per_image["bytes_per_image"] = served["bytes"] / images
            if delay == 0:
                yield Record("storage", "loader_bucket_vs_disk", "img/s", whole, disk,
                             "the same shards on local disk", config, extra=per_image)
            ranged = _ranged_rate(bucket, ctx, cores, batches=4 if delay else 10)
            yield Record("storage", f"whole_shards_vs_ranged_reads_{delay}ms", "img/s", whole,
                         ranged, "DALI reading the bucket's tars, one ranged GET per image",
                         {**config, "delay_ms": delay}, extra=per_image)
        server.set_delay(0)
        # quick: a tenth of the shards (uploading 10,000 objects alone takes a minute)
        startup_shards, repeats = (STARTUP_SHARDS // 10, 1) if ctx.quick else (STARTUP_SHARDS, 2)
        startup_data = _upload_folder(many_shards(ctx, startup_shards, 20), "startup")
        for delay in DELAYS_MS:
            server.set_delay(delay)
            server.stats(reset=True)
            rate, extra = _startup(startup_data, repeats)
            requests = {method: n / repeats for method, n in server.stats()["requests"].items()}
            yield Record("storage", f"rank_startup_{startup_shards}_shards_{delay}ms", "starts/s",
                         rate, config={"shards": startup_shards, "delay_ms": delay},
                         extra={**extra, "requests_per_start": requests})
