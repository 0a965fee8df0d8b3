"""The command line every task's script shares: parse, refuse what can be refused before any work,
hand the task to the trainer, and map how the run ended to the exit status (`train.outcome.RunEnd`).

Exit 2 is only for what the user can fix before anything runs (`REFUSALS`); an error while training
that the data, the disk or the network caused (damaged data, a full disk, a lost rank, a collective
that timed out) is 5, an out-of-memory 7, each with its own line, and the checkpoint before it is
intact; anything else is a bug: it propagates with its traceback (status 1), on the rank where it
happened, and the other ranks lose their peer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.loader import dali_available, default_threads, sample_counts
from pipeline.synthetic_loader import IMAGENET_TRAIN_SAMPLES
from train.checkpoint import estimated_checkpoint_bytes, resume_tag
from train.config import ConfigError, RunConfig, describe, load_config
from train.distributed import join_process_group, leave_process_group
from train.engine import deepspeed_config, image_dtype
from train.metrics import MetricsLog
from train.outcome import REFUSALS, RunEnd, failure_kind
from train.recipe import optimizer_steps_per_epoch, peak_lr, plan_batch
from train.run_folder import existing_run
from train.task import RunContext, Task
from train.trainer import Trainer


def parse_args(argv: list[str] | None, task: type[Task]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=task.script, description=f"{task.name} with DeepSpeed ZeRO"
    )
    parser.add_argument(
        "--config", help=f"preset file, or a name in configs/ (e.g. {task.example_preset})"
    )
    parser.add_argument("--data", help="shard folder or brace pattern (sets data.shards)")
    parser.add_argument("--output", help="output folder (sets output)")
    parser.add_argument(
        "--max-steps", type=int, help="stop after this many optimizer steps in total"
    )
    parser.add_argument(
        "--log-every", type=int, help="steps between metric reductions (sets log.log_every)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="TAG",
        help="continue from the newest checkpoint in the output, or from TAG (e.g. step00001200 or "
        "1200; what the run did after it is set aside in OUTPUT/abandoned/), on any number of "
        "ranks",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="dry run: print every config field with its doc, the batch plan for --ranks, the lr "
             "and the DeepSpeed config, check --data, and exit",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        help="with --print-config: the number of ranks to plan for (default: WORLD_SIZE, or 1)",
    )
    parser.add_argument(
        "--eval",
        metavar="WEIGHTS",
        type=Path,
        help="evaluate a weight file on the held-out split (eval.split) as the run's own "
             "evaluation does, print the figures as one JSON line and exit; trains nothing, "
             "writes nothing (fine-tuning: best.pth, an export, a reference checkpoint)",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def print_plan(cfg: RunConfig, ranks: int, task: type[Task]) -> None:
    """--print-config: what a run of `cfg` on `ranks` ranks would do, checked as far as it can be
    without them."""
    if ranks < 1:
        raise ConfigError(f"--ranks must be at least 1, got {ranks}")
    plan = plan_batch(cfg.optim, ranks)
    lines = [*describe(cfg), "",
             f"batch on {ranks} ranks: {plan.global_batch_size} = {plan.local_batch_size} local x "
             f"{plan.grad_accum_steps} accumulation x {ranks} ranks ({plan.note})",
             f"peak lr: {peak_lr(cfg.optim, plan.global_batch_size):.4g}"]
    if cfg.data.shards or cfg.data.backend == "synthetic":
        samples = sum(
            sample_counts(cfg.data.shards, "train", cfg.data.backend, cfg.data.synthetic_samples)
        )
        where = "synthetic images" if cfg.data.backend == "synthetic" else cfg.data.shards
    else:
        samples, where = IMAGENET_TRAIN_SAMPLES, "no --data: ImageNet-1k's train split assumed"
    steps = optimizer_steps_per_epoch(samples, plan)
    lines.append(
        f"data: {samples:,} training samples ({where}): {steps:,} optimizer steps per epoch"
    )
    total = steps * cfg.optim.epochs
    stops = f", stopped by max_steps at {cfg.max_steps:,}" if 0 < cfg.max_steps < total else ""
    lines.append(f"run: {cfg.optim.epochs} epochs = {total:,} optimizer steps, "
                 f"{total * plan.global_batch_size / 1e6:,.1f} M images{stops}")
    with torch.device("meta"):  # the shapes alone: no memory, no initialisation
        model = task.model_shape(cfg)
    size, keep = estimated_checkpoint_bytes(model), cfg.checkpoint.keep_last
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(
        f"checkpoints: about {size / 1e9:.2f} GB each "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters' fp32 weights, "
        f"AdamW's two moments of the {trained / 1e6:.1f} M trained); keep_last {keep} peaks at "
        f"{keep + 1} of them ({(keep + 1) * size / 1e9:.1f} GB) while a new one is written"
        + (", plus one per milestone" if cfg.checkpoint.milestone_every_epochs else "")
    )
    if cfg.data.backend == "dali" and dali_available():
        from pipeline.dali_graph import reservation  # imports DALI

        threads = cfg.data.num_threads or default_threads()
        source = "data.num_threads" if cfg.data.num_threads else \
            "this machine's cores per local rank: set data.num_threads for the nodes'"
        lines.append(
            f"loader: DALI's GPU decoding reserves {reservation(threads)} per rank at {threads} "
            f"decoder threads ({source}), beside the model's own memory"
        )
    lines += ["deepspeed config:", json.dumps(deepspeed_config(cfg, plan), indent=1)]
    print("\n".join(lines))


def checked_config(args: argparse.Namespace, task: type[Task]) -> RunConfig:
    """The run's config, and every check that needs no process group: refused here, nothing has
    started."""
    overrides = list(args.set)
    for flag, key in (
        (args.data, "data.shards"),
        (args.output, "output"),
        (args.max_steps, "max_steps"),
        (args.log_every, "log.log_every"),
    ):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    cfg = load_config(args.config, overrides, task=task)
    if args.print_config:
        return cfg
    if args.eval is not None:
        if not args.eval.is_file():
            raise FileNotFoundError(f"--eval {args.eval}: no such weight file")
        # the split is there and whole
        sample_counts(cfg.data.shards, cfg.eval.split, cfg.data.backend)
        return cfg
    if not cfg.data.shards and cfg.data.backend != "synthetic":
        raise ConfigError(
            "no training data: pass --data SHARDS, set data.shards, or train on synthetic images "
            "with --set data.backend=synthetic"
        )
    sample_counts(cfg.data.shards, "train", cfg.data.backend)  # the shards are there and whole
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise ConfigError(f"--output {cfg.output} is a file, not a folder")
    found = existing_run(Path(cfg.output))
    if args.resume:
        # a tag that is not there: refused before work
        resume_tag(Path(cfg.output) / "checkpoints", args.resume)
    elif found:
        raise ConfigError(
            f"{cfg.output} already holds a run ({found}): pass --resume to continue it, or choose "
            "another --output"
        )
    return cfg


def evaluate_only(cfg: RunConfig, task_class: type[Task], weights: Path) -> int:
    """--eval: the task's evaluation of `weights` on every rank; rank 0 prints the figures as one
    JSON line."""
    with contextlib.ExitStack() as hold:
        hold.callback(leave_process_group)
        device = join_process_group()
        rank, world = dist.get_rank(), dist.get_world_size()
        # an evaluation records nothing
        silent = MetricsLog(Path(cfg.output), is_main=False, tensorboard=False)
        ctx = RunContext(cfg, device, rank, world, plan_batch(cfg.optim, world), image_dtype(cfg),
                         dist.new_group(backend="gloo"), silent, lambda line: None, hold)
        result = task_class(ctx).evaluate(weights)
        if rank == 0:
            print(
                json.dumps({"weights": str(weights), "split": cfg.eval.split, **result}), flush=True
            )
    return RunEnd.FINISHED


def main(task: type[Task], argv: list[str] | None = None) -> int:
    """Exit status: a RunEnd (README, "Exit codes")."""
    args = parse_args(argv, task)
    try:
        cfg = checked_config(args, task)
        if args.print_config:
            print_plan(
                cfg,
                args.ranks if args.ranks is not None else int(os.environ.get("WORLD_SIZE", "1")),
                task,
            )
            return RunEnd.FINISHED
        if args.eval is not None:
            return evaluate_only(cfg, task, args.eval)
        trainer = Trainer(cfg, task, args.resume)  # closes what it took if it refuses
    except REFUSALS as err:
        print(f"error: {err}", file=sys.stderr)
        leave_process_group()
        return RunEnd.REFUSED
    with trainer:
        try:
            return trainer.fit()
        except Exception as err:  # sorted below: a failure of the machine or the data, or a bug
            watchdog = trainer.monitor.watchdog
            if watchdog.overdue():  # this rank was the frozen one: its stuck call failed as it woke
                watchdog.report("".join(traceback.format_exception(err)))
                return RunEnd.HUNG
            return report_failure(err, trainer)


def report_failure(err: Exception, trainer: Trainer) -> RunEnd:
    """One line for an error the data, the disk, the network or the device's memory caused, and the
    status it ends the run with; a bug is raised again, with its traceback (exit 1)."""
    kind = failure_kind(err)
    lost = trainer.peers.lost()
    if kind is None and not lost:
        raise err
    where = f"at step {trainer.state.step} on rank {trainer.rank}"
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    last = "the last checkpoint is intact"
    if kind == "memory":
        plan, model = trainer.plan, trainer.cfg.model
        print(
            f"error: out of memory {where} ({cause}): the local batch of {plan.local_batch_size} "
            "does not fit; lower optim.max_local_batch_size (the global batch stays, in more "
            "accumulation steps) or set model.activation_recompute=true"
            f"{' (it is on)' if model.activation_recompute else ''}, then continue with --resume "
            f"({last})",
            file=sys.stderr,
        )
        return RunEnd.OUT_OF_MEMORY
    if kind == "data":
        what = (f"damaged data {where}: {cause}; rebuild or replace it (`python -m "
                "pipeline.build_shards --verify`)")
    elif kind == "storage":
        what = (f"the shards' object store failed {where}: {cause}; check the endpoint, the "
                "credentials and the network")
    elif kind == "disk":
        what = f"no room to write {where}: {cause}; free space or move the run"
    else:
        what = f"lost a peer {where}: {lost or cause}; check the other ranks' logs and their nodes"
    print(f"error: {what}, then continue with --resume ({last})", file=sys.stderr)
    return RunEnd.FAILED
