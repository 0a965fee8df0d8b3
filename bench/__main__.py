"""`python -m bench {shards,pipeline,kernels,model,train,train_shards,finetune,control,all}
[--quick] [--device cpu|gpu] [--out DIR] [--mirror DIR]` measures and appends each record to the
history as it is measured; `python -m bench report` turns the history into REPORT.md."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import pipeline.storage as storage
from bench.context import BenchContext, StageUnavailable
from bench.harness import DEFAULT_HISTORY, REPO, History, Record
from bench.report import write_report
from pipeline.errors import StorageError
from pipeline.manifest import Manifest
from pipeline.storage import is_remote

# The stage modules are imported one by one below: the kernel stage's Triton kernels must see
# TRITON_INTERPRET before they are defined, and a stage's packages may be missing on this machine.
STAGES = {"shards": ("bench.shards", "run"), "pipeline": ("bench.pipeline", "run"),
          "kernels": ("bench.kernels", "run"), "model": ("bench.model", "run"),
          "train": ("bench.train", "run"),  # the trainer on synthetic data against its bare step
          # the trainer on shards against the reference-style one
          "train_shards": ("bench.train", "run_on_shards"),
          "finetune": ("bench.finetune", "run"),
          "control": ("bench.control", "run"),  # the ranks' per-step vote, at 2 to 16 CPU ranks
          "storage": ("bench.storage", "run")}  # shards in a bucket: a local S3 server, delays


def keep_profile_beside(record: Record, history: History) -> Record:
    """A record's profile table goes to its own file beside the history file; the record keeps its
    name."""
    table = record.extra.get("profile")
    if table:
        path = history.path.with_name(
            f"{history.path.stem}.profile.{record.name.split('.')[-1]}.txt"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        history.write(path, table)
        record.extra["profile"] = path.name
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "stage", choices=[*STAGES, "all", "report"], help="what to measure, or report"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and smaller data (< 3 min on 2 CPUs)"
    )
    parser.add_argument(
        "--device", choices=["cpu", "gpu"], help="default: gpu if CUDA is available"
    )
    parser.add_argument("--out", help="history folder to append to (default bench/history)")
    parser.add_argument("--history", help="report: history folder to read (default bench/history)")
    parser.add_argument(
        "--mirror",
        help="also keep a copy of the history file and its profiles here, refreshed as "
        "each record lands (the folder a job's outputs are collected from)",
    )
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "maeflow-bench"),
                        help="where generated bench data is cached")
    parser.add_argument(
        "--data",
        help="pipeline: measure the loader on these shards (a folder with train.json, or "
        "s3://bucket/prefix)",
    )
    parser.add_argument(
        "--local-batch-size", type=int, help="pipeline --data: images per batch (256 GPU, 32 CPU)"
    )
    parser.add_argument(
        "--preset",
        default="vit_b16_1600ep",
        help="pipeline --data: the training preset whose speed the loader must keep up with",
    )
    args = parser.parse_args(argv)
    if args.data and args.stage != "pipeline":
        parser.error("--data goes with the pipeline stage")
    data = None if not args.data else args.data if is_remote(args.data) else Path(args.data)
    if data is not None:
        try:
            found = storage.exists(Manifest.path(data, "train"))
        except StorageError as err:
            parser.error(f"--data {err}")
        if not found:
            parser.error(
                f"--data {args.data}: no train.json there (a shard folder or bucket prefix built "
                "by pipeline.build_shards)"
            )
    if args.local_batch_size is not None and args.local_batch_size < 1:
        parser.error(f"--local-batch-size must be at least 1, got {args.local_batch_size}")
    if not (Path(args.preset).is_file() or (REPO / "configs" / f"{args.preset}.toml").is_file()):
        known = ", ".join(sorted(p.stem for p in (REPO / "configs").glob("*.toml")))
        parser.error(f"--preset {args.preset}: no such preset (known: {known})")

    if args.stage == "report":
        history = Path(args.history or DEFAULT_HISTORY)
        # an empty report would replace a real one
        if not history.is_dir() or not any(history.glob("*.json")):
            what = "holds no history file (*.json)" if history.is_dir() else "does not exist"
            parser.error(f"--history {history} {what}: the report is left as it is")
        report = write_report(history, Path(args.out or REPO / "bench"))
        print(f"wrote {report}")
        return 0

    device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu but torch sees no CUDA device")
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    if device == "cpu" and "kernels" in stages:
        # Triton kernels can only run on a CPU in the interpreter, which must be on before they are
        # defined.
        os.environ["TRITON_INTERPRET"] = "1"

    ctx = BenchContext(
        device, args.quick, Path(args.work), data, args.local_batch_size, args.preset
    )
    history = History(Path(args.out or DEFAULT_HISTORY), device, args.quick,
                      Path(args.mirror) if args.mirror else None)
    for stage in stages:
        began = time.perf_counter()
        module, function = STAGES[stage]
        history.start_run()
        try:
            # each record kept as it comes
            for r in getattr(importlib.import_module(module), function)(ctx):
                history.add(keep_profile_beside(r, history))
                base = (
                    f" vs {r.baseline.median:.4g} ({r.baseline_name}): x{r.ratio:.2f}"
                    if r.baseline
                    else ""
                )
                tag = " [interpreter]" if r.interpreter else ""
                print(
                    f"{r.stage:8} {r.name:45} {r.ours.median:>10.4g} {r.unit}{base}{tag}",
                    flush=True,
                )
        except StageUnavailable as why:
            print(f"{stage}: skipped ({why})")
            continue
        print(f"{stage}: {time.perf_counter() - began:.0f} s")
    print(f"history: {history.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
