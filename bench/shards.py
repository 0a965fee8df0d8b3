"""Shard builder throughput: against `tar cf` of the same files, and from an archive against the
same images extracted (ImageNet's layout: a tar of per-class tars, read in place), with the
builder's peak memory and a projection of ImageNet-1k's build time from the measured rate per core;
a whole build's peak memory at 100,000 and 1 M small images; and the memory the builder's listing
and plan take at 1 M and 10 M simulated files, the growth per image beside it."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.context import BenchContext, require
from bench.harness import Record, rate, stat_of, time_repeats
from pipeline.archives import Entry
from pipeline.sample_data import synthetic_photo
from pipeline.shard_labels import ClassFolders
from pipeline.shard_listing import Listing
from pipeline.shard_order import DEFAULT_SORT_BUFFER

IMAGENET_TRAIN_IMAGES = 1_281_167


def tar_of_class_tars(tree: Path, target: Path) -> Path:
    """`tree`'s images packed as ImageNet distributes its train set: one tar per class inside one
    tar."""
    with tarfile.open(target, "w") as outer:
        for folder in sorted(p for p in tree.iterdir() if p.is_dir()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for image in sorted(folder.iterdir()):
                    tar.add(image, arcname=image.name)
            info = tarfile.TarInfo(f"{folder.name}.tar")
            info.size = inner.tell()
            outer.addfile(info, io.BytesIO(inner.getvalue()))
    return target


def peak_memory_mb(argv: list[str]) -> float:
    """The largest resident set of a build and its worker processes, run on its own."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "pipeline.build_shards", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1]) / 1024


def tiny_images_archive(images: int, target: Path, classes: int = 1000) -> Path:
    """`images` small JPEGs (32x32, under 1 KB) in a tar of class folders, written as it streams: a
    data set of millions of files that the builder reads by offset, as it reads ImageNet's tars."""
    photo = io.BytesIO()
    synthetic_photo(0, 0, 7).resize((32, 32)).save(photo, "JPEG", quality=90)
    data = photo.getvalue()
    with tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(images):
            info = tarfile.TarInfo(f"n{i % classes:08d}/n{i % classes:08d}_{i}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def simulated_listing(images: int, classes: int = 1000) -> Iterator[Entry]:
    """A class-folder listing of `images` ImageNet-style names, 110 KB each, made as it streams (no
    files)."""
    for c in range(classes):
        yield Entry(f"n{c:08d}/", "/data/imagenet/train", 0, problem="a folder")
    for i in range(images):
        name = f"n{i % classes:08d}/n{i % classes:08d}_{i}.JPEG"
        yield Entry(name, "/data/imagenet/train/" + name, 110_000)


def plan_simulated_build(images: int, work: Path, sort_buffer: int = DEFAULT_SORT_BUFFER,
                         workers: int = 1) -> list[int]:
    """The builder's work before it writes a shard, over a simulated listing: list, label, shuffle,
    cut into 1 GiB shards, as `build_shards` does them. Returns the shards' sizes."""
    # it needs braceexpand: `run` checks for it
    from pipeline.build_shards import BuildOptions, shuffled

    options = BuildOptions(
        src=Path("/data/imagenet/train"), out=work, sort_buffer=sort_buffer, workers=workers
    )
    skipped: list[dict] = []
    labels = ClassFolders(Listing(simulated_listing(images)), None, skipped)
    return shuffled(options, labels, work, skipped)[1].shard_sizes


# The growth of the resident set while the builder plans `n` simulated images with a sort buffer of
# `b`: the peak is restarted after the imports (Linux's clear_refs), so the interpreter's own never
# hides the plan's.
PLAN_MEMORY_PROBE = """
import sys, tempfile
from pathlib import Path
from bench.shards import plan_simulated_build
def status_mb(field):
    status = open("/proc/self/status").read().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_mb("VmRSS:")
with tempfile.TemporaryDirectory() as work:
    plan_simulated_build(int(sys.argv[1]), Path(work), int(sys.argv[2]))
print(status_mb("VmHWM:") - before)
"""


def plan_memory_mb(images: int, sort_buffer: int) -> float:
    """Peak resident memory the builder's listing and plan add over `images` simulated files."""
    done = subprocess.run(
        [sys.executable, "-c", PLAN_MEMORY_PROBE, str(images), str(sort_buffer)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return float(done.stdout.split()[-1])


def held_at_once(images: int, sort_buffer: int) -> int:
    """Candidates the shuffle holds at once: a part over the buffer is split 256 ways, again until
    it fits."""
    while images > sort_buffer:
        images = -(-images // 256)
    return images


def plan_memory_record(ctx: BenchContext) -> Record:
    """The builder's memory planning a build: at two sizes with the default sort buffer, and at the
    larger with a small one, so that the split the buffer forces shows; with the per-image cost, the
    projection to 2 B files."""
    # Quick: sizes a few seconds plan (the trend between them is the record); the full run plans
    # ImageNet's scale.
    sizes, small_buffer = (
        ((10_000, 100_000), 250) if ctx.quick else ((1_000_000, 10_000_000), 20_000)
    )
    runs = [
        (sizes[0], DEFAULT_SORT_BUFFER),
        (sizes[1], DEFAULT_SORT_BUFFER),
        (sizes[1], small_buffer),
    ]
    peaks, seconds = {}, {}
    for images, buffer in runs:
        started = time.perf_counter()
        peaks[images, buffer] = plan_memory_mb(images, buffer)
        seconds[images, buffer] = time.perf_counter() - started
    held = {run: held_at_once(*run) for run in runs}
    per_held = (peaks[runs[1]] - peaks[runs[0]]) * 2**20 / (held[runs[1]] - held[runs[0]])
    fixed = peaks[runs[0]] - held[runs[0]] * per_held / 2**20
    projected = {str(n): round(fixed + held_at_once(n, DEFAULT_SORT_BUFFER) * per_held / 2**20)
                 for n in (14_197_122, 100_000_000, 2_000_000_000)}
    extra = {"peak_mb": {f"{n} images, buffer {b}": round(mb, 1) for (n, b), mb in peaks.items()},
             "held_at_once": {f"{n} images, buffer {b}": h for (n, b), h in held.items()},
             "bytes_per_held_image": round(per_held), "projected_mb": projected,
             "bound_mb": round(fixed + DEFAULT_SORT_BUFFER * per_held / 2**20),
             "plan_s": {f"{n} images, buffer {b}": round(t, 1) for (n, b), t in seconds.items()},
             "plan_us_per_image": round(seconds[runs[1]] / sizes[1] * 1e6, 1)}
    return Record(
        "shards",
        "builder_plan_peak_mb",
        "MB",
        stat_of([peaks[runs[1]]]),
        config={
            "images": sizes[1],
            "sort_buffer": DEFAULT_SORT_BUFFER,
            "simulated": "class-folder listing of ImageNet-style names, 110 KB each",
            "what": "listing spilled to disk, labels, external shuffle by keyed hash, plan "
                    "fingerprint, cut into 1 GiB shards",
        },
        extra=extra,
    )


def real_build_record(ctx: BenchContext, scratch: Path, workers: int) -> Record:
    """A whole build (list, shuffle, write, index, manifest) of small images from one tar at two
    sizes: the largest resident set among its processes, and its time; the growth between the two is
    what a larger data set adds."""
    sizes = (1_000, 10_000) if ctx.quick else (100_000, 1_000_000)
    peaks, seconds = {}, {}
    for images in sizes:
        archive = tiny_images_archive(images, scratch / f"tiny_{images}.tar")
        out = scratch / f"tiny_{images}"
        started = time.perf_counter()
        peaks[images] = peak_memory_mb(
            [str(archive), str(out), "--shard-size-mb", "64", "--workers", str(workers), "--quiet"]
        )
        seconds[images] = time.perf_counter() - started
        archive.unlink()
        shutil.rmtree(out)
    growth = (peaks[sizes[1]] - peaks[sizes[0]]) * 2**20 / (sizes[1] - sizes[0])
    return Record("shards", "builder_peak_mb", "MB", stat_of([peaks[sizes[1]]]),
                  config={"images": sizes[1], "workers": workers, "shard_size_mb": 64,
                          "data": "32x32 JPEGs (under 1 KB) in one tar of 1,000 class folders"},
                  extra={"peak_mb": {str(n): round(mb, 1) for n, mb in peaks.items()},
                         "build_s": {str(n): round(t, 1) for n, t in seconds.items()},
                         "img_per_s": {str(n): round(n / t) for n, t in seconds.items()},
                         "bytes_per_image_between": round(growth, 1)})


def run(ctx: BenchContext) -> list[Record]:
    require("braceexpand")
    from pipeline.build_shards import main as build_shards  # after the check: it needs braceexpand

    # ~110 KB photos: a rate that projects to ImageNet
    tree = ctx.imagenet_like_tree(384 if ctx.quick else 1536)
    files = [p for p in tree.rglob("*") if p.is_file()]
    megabytes = sum(p.stat().st_size for p in files) / 2**20
    workers = os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="maeflow-bench-shards-"))
    archive = tar_of_class_tars(tree, scratch / "train.tar")
    common = ["--shard-size-mb", "64", "--workers", str(workers), "--quiet"]
    try:
        def build_from(src: Path) -> None:
            shutil.rmtree(scratch / "out", ignore_errors=True)
            build_shards([str(src), str(scratch / "out"), *common])

        def tar() -> None:
            subprocess.run(
                ["tar", "cf", str(scratch / "plain.tar"), "-C", str(tree), "."], check=True
            )

        repeats = 2 if ctx.quick else 5
        # Interleaved, so that a machine's drift touches both sides alike.
        tree_s, archive_s = [], []
        for _ in range(repeats):
            tree_s += time_repeats(lambda: build_from(tree), 1)
            archive_s += time_repeats(lambda: build_from(archive), 1)
        tar_s = time_repeats(tar, repeats)
        # The builder reads by offset: its memory must not grow with the archive (here ~8x smaller,
        # same peak).
        small = tar_of_class_tars(ctx.sample_tree(), scratch / "small.tar")
        memory = {name: peak_memory_mb([str(src), str(scratch / f"memory_{name}"), *common])
                  for name, src in (("tree", tree), ("archive", archive), ("small_archive", small))}
        at_scale = real_build_record(ctx, scratch, workers)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config = {
        "images": len(files),
        "source_mb": round(megabytes, 2),
        "workers": workers,
        "data": "ImageNet-like JPEGs",
        "what": "shuffle, validate (1/8-scale decode), write tar + DALI index + manifest",
    }
    per_core = len(files) / min(tree_s) / workers
    projection = {"img_per_s_per_core": per_core,
                  "imagenet_build_hours": {cores: IMAGENET_TRAIN_IMAGES / (per_core * cores) / 3600
                                           for cores in (16, 64)},
                  "peak_memory_mb": memory}
    return [
        plan_memory_record(ctx),
        at_scale,
        Record(
            "shards",
            "builder_mb_per_s",
            "MB/s",
            rate(megabytes, tree_s),
            rate(megabytes, tar_s),
            "tar cf",
            config,
        ),
        Record(
            "shards",
            "builder_img_per_s",
            "img/s",
            rate(len(files), tree_s),
            rate(len(files), tar_s),
            "tar cf",
            config,
            extra=projection,
        ),
        Record(
            "shards",
            "from_archive_img_per_s",
            "img/s",
            rate(len(files), archive_s),
            rate(len(files), tree_s),
            "the same images extracted",
            {**config, "archive": "tar of per-class tars (ImageNet's train tar)"},
            extra={"peak_memory_mb": memory},
        ),
    ]
