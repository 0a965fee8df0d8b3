"""Shard builder throughput: against `tar cf` of the same files, and from an archive against the same images
extracted (ImageNet's layout: a tar of per-class tars, read in place), with the builder's peak memory and a
projection of ImageNet-1k's build time from the measured rate per core; and the memory the builder's listing and plan
take at 1 M and 10 M simulated files, the growth per image beside it."""

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
from pipeline.shard_order import DEFAULT_SORT_BUFFER
from pipeline.shard_sources import ClassFolders, Listing

IMAGENET_TRAIN_IMAGES = 1_281_167


def tar_of_class_tars(tree: Path, target: Path) -> Path:
    """`tree`'s images packed as ImageNet distributes its train set: one tar per class inside one tar."""
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
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "pipeline.build_shards", *argv],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def simulated_listing(images: int, classes: int = 1000) -> Iterator[Entry]:
    """A class-folder listing of `images` ImageNet-style names, 110 KB each, made as it streams (no files)."""
    for c in range(classes):
        yield Entry(f"n{c:08d}/", "/data/imagenet/train", 0, problem="a folder")
    for i in range(images):
        name = f"n{i % classes:08d}/n{i % classes:08d}_{i}.JPEG"
        yield Entry(name, "/data/imagenet/train/" + name, 110_000)


def plan_simulated_build(images: int, work: Path, sort_buffer: int = DEFAULT_SORT_BUFFER) -> list[int]:
    """The builder's work before it writes a shard, over a simulated listing: list, label, shuffle, cut into 1 GiB
    shards, as `build_shards` does them. Returns the shards' sizes."""
    from pipeline.build_shards import BuildOptions, shuffled  # it needs braceexpand: `run` checks for it

    options = BuildOptions(src=Path("/data/imagenet/train"), out=work, sort_buffer=sort_buffer)
    skipped: list[dict] = []
    labels = ClassFolders(Listing(simulated_listing(images)), None, skipped)
    return shuffled(options, labels, work, skipped)[1].shard_sizes


# The builder's peak memory planning `n` simulated images (n = 0: the interpreter and imports alone).
PLAN_MEMORY_PROBE = """
import resource, sys, tempfile
from pathlib import Path
from bench.shards import plan_simulated_build
n = int(sys.argv[1])
if n:
    with tempfile.TemporaryDirectory() as work:
        plan_simulated_build(n, Path(work))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def plan_memory_mb(images: int) -> float:
    """Peak resident memory of the builder's listing and plan over `images` simulated files, less the interpreter's."""
    def peak(n: int) -> float:
        done = subprocess.run([sys.executable, "-c", PLAN_MEMORY_PROBE, str(n)], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent.parent)
        return int(done.stdout.split()[-1]) / 1024

    return peak(images) - peak(0)


def plan_memory_record(ctx: BenchContext) -> Record:
    """The builder's memory planning a build, at two sizes: bounded by its sort buffer, not by the data set."""
    sizes = (100_000, 1_000_000) if ctx.quick else (1_000_000, 10_000_000)
    seconds, peaks = {}, {}
    for n in sizes:
        started = time.perf_counter()
        peaks[n] = plan_memory_mb(n)
        seconds[n] = time.perf_counter() - started
    per_image = (peaks[sizes[1]] - peaks[sizes[0]]) * 2**20 / (sizes[1] - sizes[0])
    extra = {"peak_mb": {str(n): round(mb, 1) for n, mb in peaks.items()},
             "growth_bytes_per_image": round(per_image, 2), "plan_s": {str(n): round(s, 1) for n, s in seconds.items()},
             "plan_us_per_image": round(seconds[sizes[1]] / sizes[1] * 1e6, 1)}
    return Record("shards", "builder_plan_peak_mb", "MB", stat_of([peaks[sizes[1]]]),
                  config={"images": sizes[1], "sort_buffer": DEFAULT_SORT_BUFFER,
                          "simulated": "class-folder listing of ImageNet-style names, 110 KB each",
                          "what": "listing spilled to disk, labels, external shuffle by keyed hash, plan fingerprint, "
                                  "cut into 1 GiB shards"},
                  extra=extra)


def run(ctx: BenchContext) -> list[Record]:
    require("braceexpand")
    from pipeline.build_shards import main as build_shards  # after the check: it needs braceexpand

    tree = ctx.imagenet_like_tree(384 if ctx.quick else 1536)  # ~110 KB photos: a rate that projects to ImageNet
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
            subprocess.run(["tar", "cf", str(scratch / "plain.tar"), "-C", str(tree), "."], check=True)

        repeats = 2 if ctx.quick else 5
        # Interleaved, so that a machine's drift touches both sides alike.
        tree_s, archive_s = [], []
        for _ in range(repeats):
            tree_s += time_repeats(lambda: build_from(tree), 1)
            archive_s += time_repeats(lambda: build_from(archive), 1)
        tar_s = time_repeats(tar, repeats)
        # The builder reads by offset: its memory must not grow with the archive (here ~8x smaller, same peak).
        small = tar_of_class_tars(ctx.sample_tree(), scratch / "small.tar")
        memory = {name: peak_memory_mb([str(src), str(scratch / f"memory_{name}"), *common])
                  for name, src in (("tree", tree), ("archive", archive), ("small_archive", small))}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config = {"images": len(files), "source_mb": round(megabytes, 2), "workers": workers, "data": "ImageNet-like JPEGs",
              "what": "shuffle, validate (1/8-scale decode), write tar + DALI index + manifest"}
    per_core = len(files) / min(tree_s) / workers
    projection = {"img_per_s_per_core": per_core,
                  "imagenet_build_hours": {cores: IMAGENET_TRAIN_IMAGES / (per_core * cores) / 3600
                                           for cores in (16, 64)},
                  "peak_memory_mb": memory}
    return [
        plan_memory_record(ctx),
        Record("shards", "builder_mb_per_s", "MB/s", rate(megabytes, tree_s), rate(megabytes, tar_s), "tar cf",
               config),
        Record("shards", "builder_img_per_s", "img/s", rate(len(files), tree_s), rate(len(files), tar_s), "tar cf",
               config, extra=projection),
        Record("shards", "from_archive_img_per_s", "img/s", rate(len(files), archive_s), rate(len(files), tree_s),
               "the same images extracted", {**config, "archive": "tar of per-class tars (ImageNet's train tar)"},
               extra={"peak_memory_mb": memory}),
    ]
