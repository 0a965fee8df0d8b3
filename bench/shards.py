"""Shard builder throughput (MB/s of source images) against `tar cf` of the same files."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.context import BenchContext, require
from bench.harness import Record, rate, time_repeats


def run(ctx: BenchContext) -> list[Record]:
    require("braceexpand")
    from pipeline.build_shards import main as build_shards  # after the check: it needs braceexpand

    tree = ctx.sample_tree()
    files = [p for p in tree.rglob("*") if p.is_file()]
    megabytes = sum(p.stat().st_size for p in files) / 2**20
    workers = os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="maeflow-bench-shards-"))
    try:
        def ours() -> None:
            shutil.rmtree(scratch / "out", ignore_errors=True)
            build_shards([str(tree), str(scratch / "out"), "--shard-size-mb", "64", "--workers", str(workers),
                          "--quiet"])

        def tar() -> None:
            subprocess.run(["tar", "cf", str(scratch / "plain.tar"), "-C", str(tree), "."], check=True)

        repeats = 2 if ctx.quick else 5
        ours_s, tar_s = time_repeats(ours, repeats), time_repeats(tar, repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config = {"images": len(files), "source_mb": round(megabytes, 2), "workers": workers,
              "what": "shuffle, validate (1/8-scale decode), write tar + DALI index + manifest"}
    return [
        Record("shards", "builder_mb_per_s", "MB/s", rate(megabytes, ours_s), rate(megabytes, tar_s), "tar cf",
               config),
        Record("shards", "builder_img_per_s", "img/s", rate(len(files), ours_s), rate(len(files), tar_s), "tar cf",
               config),
    ]
