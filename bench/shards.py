"""Shard builder throughput: against `tar cf` of the same files, and from an archive against the same images
extracted (ImageNet's layout: a tar of per-class tars, read in place), with the builder's peak memory and a
projection of ImageNet-1k's build time from the measured rate per core."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.context import BenchContext, require
from bench.harness import Record, rate, time_repeats

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
        Record("shards", "builder_mb_per_s", "MB/s", rate(megabytes, tree_s), rate(megabytes, tar_s), "tar cf",
               config),
        Record("shards", "builder_img_per_s", "img/s", rate(len(files), tree_s), rate(len(files), tar_s), "tar cf",
               config, extra=projection),
        Record("shards", "from_archive_img_per_s", "img/s", rate(len(files), archive_s), rate(len(files), tree_s),
               "the same images extracted", {**config, "archive": "tar of per-class tars (ImageNet's train tar)"},
               extra={"peak_memory_mb": memory}),
    ]
