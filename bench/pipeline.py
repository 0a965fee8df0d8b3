"""Data path, in images/s at 224: what `build_loader` delivers against the DALI graph it wraps
(driven directly, one pipeline kept running), what an epoch boundary costs, and the decoders a user
could choose from (DALI on the GPU with and without the hardware decoder, DALI on the CPU, PIL with
every core), on ImageNet-like JPEGs (~115 KB, mostly ~500x375); then what a rank pays for the size
of the data set (`bench.data_scale`: its epoch plan up to 2 B samples, its start-up over 100,000
shards).

    python -m bench pipeline [--device gpu]                 generated data, enough for >= 20 batches
    an epoch python -m bench pipeline --data SHARDS [--local-batch-size 256] [--preset
    vit_b16_1600ep]
                                                            your shards on your storage: does it
                                                            keep up?
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from bench.context import BenchContext, require
from bench.data_scale import plan_records, startup_records
from bench.harness import Record, Stat, load_history, stat_of


def batch_times(
    loader, epochs: range, sync: bool, finish: Callable | None = None
) -> list[list[float]]:
    """Per epoch, the moment each batch reached the consumer (after `finish(images, labels)`, the
    batch work the consumer does, when given)."""
    timeline = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        arrivals = []
        for images, labels in loader:
            if finish is not None:
                finish(images, labels)
            if sync:
                torch.cuda.synchronize()
            arrivals.append(time.perf_counter())
        timeline.append(arrivals)
    return timeline


def delivered_and_boundary(timeline: list[list[float]], batch: int) -> tuple[Stat, float, float]:
    """(delivered images/s, median epoch-boundary cost in s, median batch time in s), the first
    epoch left out as warm-up.

    The rate runs from each epoch's first batch to the next epoch's first batch (the last epoch: to
    its last batch), so boundaries count and the next epoch's prefetching is not taken for overhead.
    The boundary cost is the gap between an epoch's last batch and the next one's first, less a
    batch time."""
    measured = timeline[1:]
    ends = [later[0] for later in measured[1:]] + [measured[-1][-1]]
    counts = [len(t) for t in measured[:-1]] + [len(measured[-1]) - 1]
    rates = [
        count * batch / (end - t[0]) for t, end, count in zip(measured, ends, counts, strict=True)
    ]
    intervals = [b - a for t in measured for a, b in itertools.pairwise(t)]
    batch_s = statistics.median(intervals)
    gaps = [later[0] - earlier[-1] - batch_s for earlier, later in itertools.pairwise(timeline)]
    return stat_of(rates), statistics.median(gaps), batch_s


def within_epoch_rate(timeline: list[list[float]], batch: int) -> Stat:
    """Images/s from each epoch's first batch to its last, the first epoch left out: the steady
    state, with no boundary in it (that cost is reported on its own)."""
    return stat_of([(len(t) - 1) * batch / (t[-1] - t[0]) for t in timeline[1:]])


def memory_mb(device: str) -> float:
    """This process's resident memory, plus the GPU's used memory (DALI allocates outside torch)."""
    rss_kb = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmRSS")
    )
    used = 0.0
    if device == "gpu":
        free, total = torch.cuda.mem_get_info()
        used = total - free
    return rss_kb / 1024 + used / 2**20


def loader_run(
    shards: Path, backend: str, device: str, threads: int, batch: int, epochs: int
) -> dict:
    from pipeline import build_loader  # after run()'s check: it needs braceexpand

    loader = build_loader(
        shards,
        local_batch_size=batch,
        img_size=224,
        backend=backend,
        device=device,
        num_threads=threads,
        dtype=torch.bfloat16 if device == "gpu" else torch.float32,
    )
    if loader.backend != backend:
        raise RuntimeError(f"asked for the {backend} loader, got {loader.backend}")
    timeline = batch_times(loader, range(1), device == "gpu")
    after_first_epoch = memory_mb(device)
    timeline += batch_times(loader, range(1, epochs), device == "gpu")
    delivered, boundary_s, batch_s = delivered_and_boundary(timeline, batch)
    return {
        "delivered": delivered,
        "within_epoch": within_epoch_rate(timeline, batch),
        "boundary_s": boundary_s,
        "batch_s": batch_s,
        "batches": len(loader),
        "loader": loader,
        "memory_growth_mb": memory_mb(device) - after_first_epoch,
    }


def raw_graph_rate(loader, hw_decoder_load: float, batches: int, repeats: int) -> Stat:
    """The loader's DALI graph driven directly over the shards' own index files: one pipeline, no
    torch conversion, no epoch ends. The ceiling `build_loader` is held against."""
    from pipeline.dali_graph import image_pipeline

    spec = loader.spec
    pipe = image_pipeline(
        spec,
        [str(p) for p in spec.shards.tars],
        [str(p) for p in spec.shards.indexes],
        hw_decoder_load,
        batch_size=spec.local_batch_size,
        num_threads=spec.num_threads,
        device_id=torch.cuda.current_device() if spec.device == "gpu" else None,
        seed=1,
        prefetch_queue_depth=2,
    )
    pipe.build()
    for _ in range(3):
        pipe.run()
    rates = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        if spec.device == "gpu":
            torch.cuda.synchronize()
        rates.append(batches * spec.local_batch_size / (time.perf_counter() - began))
    del pipe
    return stat_of(rates)


def preset_speed(preset: str) -> float | None:
    """Training img/s per GPU of `preset` in the newest GPU record of bench/history, if any."""
    best = None
    for run in load_history(Path(__file__).parent / "history"):
        if run["machine"].get("device") != "gpu":
            continue
        for record in run["records"]:
            if record["name"] == f"images_per_s.{preset}":
                best = record["ours"]["median"]
    return best


def user_shards(ctx: BenchContext) -> list[Record]:
    """The loader on the user's shards: delivered rate, boundary, and whether it feeds a preset's
    GPU."""
    from pipeline.loader import default_threads

    batch = ctx.local_batch_size or (256 if ctx.device == "gpu" else 32)
    run = loader_run(ctx.data, "dali", ctx.device, default_threads(), batch, 3 if ctx.quick else 5)
    need = preset_speed(ctx.preset)
    rate = run["delivered"].median
    if need is None:
        verdict = (f"no GPU training record of {ctx.preset} in bench/history yet: run `python -m "
                   "bench train` on a GPU")
    elif rate >= need:
        verdict = (f"keeps up with {ctx.preset} ({need:,.0f} img/s per GPU): {rate / need:.1f}x "
                   "what it consumes")
    else:
        verdict = (
            f"would starve {ctx.preset}: {rate:,.0f} of the {need:,.0f} img/s per GPU it consumes "
            f"({rate / need:.0%})"
        )
    print(f"pipeline: {ctx.data}: {rate:,.0f} img/s per rank; {verdict}")
    return [
        Record(
            "pipeline",
            "user_shards_img_per_s",
            "img/s",
            run["delivered"],
            config={
                "shards": str(ctx.data),
                "local_batch_size": batch,
                "threads": default_threads(),
                "preset": ctx.preset,
            },
            extra={
                "epoch_boundary_ms": 1e3 * run["boundary_s"],
                "batch_ms": 1e3 * run["batch_s"],
                "preset_img_per_s": need,
                "verdict": verdict,
            },
        )
    ]


def data_path_images(ctx: BenchContext) -> int:
    """ImageNet-like JPEGs the data-path measurements read: at least 20 batches an epoch (generated
    once, cached)."""
    if ctx.device == "gpu":
        return 10_240 if ctx.quick else 20_480
    return 768 if ctx.quick else 1536


def run(ctx: BenchContext) -> Iterator[Record]:
    if ctx.data is not None:
        require("nvidia.dali", "braceexpand")
        yield from user_shards(ctx)
        return
    require("nvidia.dali", "braceexpand")
    gpu = ctx.device == "gpu"
    cores = os.cpu_count() or 1
    batch = 256 if gpu else 32
    count = data_path_images(ctx)
    epochs = 3 if ctx.quick else 5
    tree = ctx.imagenet_like_tree(count)
    shards = ctx.shards_of(tree, workers=cores)
    jpeg_kb = sum(p.stat().st_size for p in tree.rglob("*.JPEG")) / count / 1024
    config = {
        "img_size": 224,
        "local_batch_size": batch,
        "images": count,
        "mean_jpeg_kb": round(jpeg_kb, 1),
        "epochs": epochs,
        "threads": cores,
        "train_augmentation": "random resized crop + flip",
    }

    dali = loader_run(shards, "dali", ctx.device, cores, batch, epochs)
    ceiling = raw_graph_rate(dali["loader"], 0.65, dali["batches"], repeats=epochs - 1)
    del dali["loader"]
    pil = loader_run(shards, "pil", ctx.device, cores, batch, epochs)
    del pil["loader"]
    boundary = {"epoch_boundary_ms": 1e3 * dali["boundary_s"], "batch_ms": 1e3 * dali["batch_s"],
                "boundary_in_batches": dali["boundary_s"] / dali["batch_s"],
                "memory_growth_mb_over_epochs": dali["memory_growth_mb"]}
    decode = "mixed (nvJPEG + HW decoder 0.65)" if gpu else "cpu"
    yield from [
        Record(
            "pipeline",
            "loader_vs_raw_graph",
            "img/s",
            dali["delivered"],
            ceiling,
            "the same DALI graph driven directly",
            {**config, "decode": decode},
            extra=boundary,
        ),
        Record(
            "pipeline",
            "loader_within_epoch_vs_raw_graph",
            "img/s",
            dali["within_epoch"],
            ceiling,
            "the same DALI graph driven directly",
            {**config, "decode": decode},
        ),
        Record(
            "pipeline",
            "dali_vs_pil",
            "img/s",
            dali["delivered"],
            pil["delivered"],
            f"PIL + DataLoader, {cores} workers",
            {**config, "decode": decode},
            extra={**boundary, "pil_epoch_boundary_ms": 1e3 * pil["boundary_s"]},
        ),
    ]
    if gpu:
        cpu_decoding = loader_run(shards, "dali", "cpu", cores, batch, epochs)
        probe = loader_run(shards, "dali", "gpu", cores, batch, 2)
        no_hw = raw_graph_rate(probe["loader"], 0.0, probe["batches"], repeats=epochs - 1)
        yield from [
            Record(
                "pipeline",
                "raw_graph_hw_decoder",
                "img/s",
                ceiling,
                no_hw,
                "hw_decoder_load 0 (nvJPEG on SMs)",
                config,
            ),
            Record(
                "pipeline",
                "dali_gpu_vs_dali_cpu",
                "img/s",
                dali["delivered"],
                cpu_decoding["delivered"],
                f"DALI CPU decoding, {cores} threads",
                config,
            ),
        ]
    # What the data set's size costs a rank (its CPU only): after the decoders, which a GPU's window
    # is for.
    yield from plan_records(ctx)
    yield from startup_records(ctx)
