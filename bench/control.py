"""What keeping the ranks in agreement costs an optimizer step: the trainer's vote on stopping and
on a checkpoint due by the clock, before (a blocking all-reduce on the CPU side-channel at every
step) and now (`train.distributed.StepVote`: issued at a step without waiting, read at the next), at
2, 4, 8 and 16 gloo ranks on this machine. Each rank's step is a fixed wait, as a host waits on its
GPU; the vote's cost per step is the time a run of steps takes with it less the time without it, on
the slowest rank.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from bench.context import BenchContext
from bench.harness import Record, Stat
from train.distributed import StepVote, free_port

RANKS = (2, 4, 8, 16)
MODES = ("none", "blocking", "issued")


def _rank(
    rank: int, world: int, port: int, steps: int, step_s: float, results: multiprocessing.Queue
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        seconds = {}
        for mode in MODES:
            vote = StepVote(dist.group.WORLD, size=2)
            dist.barrier()
            began = time.perf_counter()
            for _ in range(steps):
                time.sleep(step_s)  # the step's own work: the host waits on its device
                # what the trainer did before: every rank waits for every rank
                if mode == "blocking":
                    votes = torch.tensor([0, 0], dtype=torch.int32)
                    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
                    bool(votes[0])
                elif mode == "issued":
                    vote.cast(False, False)
            vote.close()
            seconds[mode] = time.perf_counter() - began
        results.put((rank, seconds))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def vote_seconds(world: int, steps: int, step_s: float) -> dict[str, float]:
    """Each mode's run of `steps` on `world` ranks (forked: no interpreter start per rank), its
    slowest rank."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    ranks = [
        context.Process(target=_rank, args=(r, world, port, steps, step_s, results))
        for r in range(world)
    ]
    for process in ranks:
        process.start()
    timings = [results.get(timeout=300)[1] for _ in ranks]
    for process in ranks:
        process.join(timeout=60)
        if process.exitcode != 0:
            raise RuntimeError(
                f"a rank of the {world}-rank vote bench ended with status {process.exitcode}"
            )
    return {mode: max(t[mode] for t in timings) for mode in MODES}


def run(ctx: BenchContext) -> Iterator[Record]:
    steps, step_ms = (100, 5.0) if ctx.quick else (400, 5.0)
    for world in RANKS:
        seconds = vote_seconds(world, steps, step_ms / 1000)
        cost_us = {
            mode: 1e6 * (seconds[mode] - seconds["none"]) / steps for mode in ("blocking", "issued")
        }
        per_s = {mode: steps / seconds[mode] for mode in MODES}
        yield Record(
            "control",
            f"vote_steps_per_s.{world}_ranks",
            "steps/s",
            Stat(per_s["issued"], per_s["issued"], per_s["issued"], 1),
            Stat(per_s["blocking"], per_s["blocking"], per_s["blocking"], 1),
            "a blocking all-reduce of the votes at every step (the trainer before)",
            {
                "ranks": world,
                "steps": steps,
                "step_ms": step_ms,
                "backend": "gloo, loopback",
                "cores": multiprocessing.cpu_count(),
            },
            extra={
                "vote_us_per_step": {mode: round(us, 1) for mode, us in cost_us.items()},
                "steps_per_s_without_a_vote": per_s["none"],
            },
        )
