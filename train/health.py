"""How a run is doing, beyond its loss: a hang watchdog, stacks on demand, stragglers and loss
spikes.

- `Watchdog`: a thread per rank. If no optimizer step completes within the timeout (a longer one
while the
  rank is in a known slow phase: start-up and the first steps' compilation, a checkpoint, an
  evaluation), it writes every thread's stack to OUTPUT/hangs/step<N>-rank<R>.txt (and, on NCCL,
  torch's flight recorder of the last collectives where this torch has one), prints one line naming
  the step, the rank and the host, and ends the process with the "hung" exit status, which
  train/slurm.sbatch requeues.
- `dump_stacks_on(signal)`: `kill -USR1 <pid>` appends every thread's stack to OUTPUT/stacks/ and
training
  goes on (faulthandler writes from the signal itself, so a rank stuck inside a collective answers
  too).
- `RankTimes`: each logged window, every rank's forward time and data wait (host time on CPUs, CUDA
events
  on GPUs: work that is the rank's own, not time spent waiting for its peers) and peak device
  memory, gathered over the CPU side-channel: the slowest and median rank, and a warning naming a
  rank that stays the slowest by more than a margin for several windows.
- `SpikeDetector`: a window whose loss, or gradient norm, is far above the median of the recent
windows.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# The hung run's exit status (README, "Exit codes"); train.outcome.RunEnd.HUNG has the same value.
HUNG_EXIT_STATUS = 6
SLOW_PHASE_FACTOR = 4  # start-up, checkpoints and evaluations may take this many step timeouts


class Watchdog:
    """Ends the process when this rank makes no progress for `timeout_s` (0: off)."""

    def __init__(self, timeout_s: float, output: Path, rank: int, step: Callable[[], int],
                 on_hang: Callable[[], None] | None = None) -> None:
        self.timeout_s, self.output, self.rank, self.step = timeout_s, output, rank, step
        # the main thread may be stuck in C
        self.on_hang = on_hang or (lambda: os._exit(HUNG_EXIT_STATUS))
        self.last_beat = time.monotonic()
        self.phase: str | None = "start-up"
        self._stop = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="maeflow-watchdog", daemon=True).start()

    def beat(self) -> None:
        """An optimizer step completed (one float store: nothing to measure in the step time)."""
        self.last_beat = time.monotonic()
        self.phase = None

    @contextmanager
    def slow_phase(self, name: str) -> Iterator[None]:
        """Work that may legitimately take longer than a step (a checkpoint, an evaluation)."""
        self.phase, self.last_beat = name, time.monotonic()
        try:
            yield
        finally:
            self.phase, self.last_beat = None, time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def limit_s(self) -> float:
        return self.timeout_s * (SLOW_PHASE_FACTOR if self.phase else 1)

    def overdue(self) -> bool:
        """This rank has been silent past its limit (a rank that was frozen, seen as it wakes)."""
        return self.timeout_s > 0 and time.monotonic() - self.last_beat > self.limit_s()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 10)):
            if self.overdue():
                self.report()
                self.on_hang()
                return

    def report(self, error: str = "") -> Path:
        """Write the hang report (every thread's stack, and `error`: what the stuck call raised, if
        it did) and say where it is; returns its path."""
        silent = time.monotonic() - self.last_beat
        step = self.step()
        where = f"during {self.phase}" if self.phase else f"after step {step}"
        path = self.output / "hangs" / f"step{step:08d}-rank{self.rank:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(
                f"rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}): no progress for "
                f"{silent:.0f} s {where} (limit {self.limit_s():.0f} s)\n\n"
            )
            if error:
                f.write(f"the call that was stuck ended with:\n{error}\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            _write_flight_recorder(f)
        print(
            f"HUNG: rank {self.rank} on {socket.gethostname()} made no progress for {silent:.0f} s "
            f"{where}; stacks in {path}; exiting with {HUNG_EXIT_STATUS} (resume with --resume)",
            file=sys.stderr,
            flush=True,
        )
        return path


def _write_flight_recorder(f: Any) -> None:
    """torch's record of the last NCCL collectives, where this torch build keeps one (NCCL only)."""
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None or not dist.is_initialized() or dist.get_backend() != "nccl":
        return
    try:
        f.write("\nNCCL flight recorder (pickled entries follow):\n")
        f.flush()
        f.buffer.write(dump())
    except Exception as err:  # best effort: the stacks above are the report
        f.write(f"(no flight recorder: {err})\n")


def dump_stacks_on(signum: int, output: Path, rank: int) -> Any:
    """`kill -<signum>` appends every thread's stack to OUTPUT/stacks/rank<R>-<host>.txt; returns
    the open file, which must stay open for the run."""
    folder = output / "stacks"
    folder.mkdir(parents=True, exist_ok=True)
    # held for the run
    handle = open(folder / f"rank{rank:05d}-{socket.gethostname()}.txt", "a")  # noqa: SIM115
    faulthandler.register(signum, file=handle, all_threads=True)
    return handle


@dataclass
class WindowTimes:
    """One rank's own work in a logged window."""

    forward_s: float
    data_wait_s: float
    peak_memory_gb: float | None

    @property
    def own_s(self) -> float:
        return self.forward_s + self.data_wait_s


class RankTimes:
    """Collects one rank's forward time per window and, at each log, gathers every rank's over
    `group`."""

    def __init__(
        self, device: torch.device, group: Any, hosts: list[str], margin: float, windows: int
    ) -> None:
        """`hosts`: every rank's host name, in rank order (to name the slowest)."""
        self.device, self.group, self.hosts, self.margin, self.windows = (
            device,
            group,
            hosts,
            margin,
            windows,
        )
        self.cuda = device.type == "cuda"
        # CUDA events, read at the log (already a sync point)
        self.pending: list[tuple[Any, Any]] = []
        self.forward_s = 0.0
        # (rank, consecutive windows it was a straggler)
        self.slowest_run: tuple[int, int] = (-1, 0)

    @contextmanager
    def forward(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.forward_s += time.perf_counter() - began

    def gather(self, data_wait_s: float) -> tuple[dict[str, Any], str | None]:
        """Collective over the side-channel: the window's figures for metrics.jsonl, and a straggler
        warning."""
        forward_s = (
            self.forward_s + sum(start.elapsed_time(end) for start, end in self.pending) / 1000
        )
        memory = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else -1.0
        mine = torch.tensor([forward_s, data_wait_s, memory], dtype=torch.float64)
        everyone = [torch.zeros(3, dtype=torch.float64) for _ in self.hosts]
        dist.all_gather(everyone, mine, group=self.group)
        self.forward_s, self.pending = 0.0, []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = [
            WindowTimes(float(t[0]), float(t[1]), float(t[2]) if t[2] >= 0 else None)
            for t in everyone
        ]
        return self._summary(times)

    def _summary(self, times: list[WindowTimes]) -> tuple[dict[str, Any], str | None]:
        own = [t.own_s for t in times]
        slowest = max(range(len(times)), key=own.__getitem__)
        median = statistics.median(own)
        record = {
            "rank_forward_s_max": max(t.forward_s for t in times),
            "rank_forward_s_median": statistics.median(t.forward_s for t in times),
            "rank_data_wait_s_max": max(t.data_wait_s for t in times),
            "rank_data_wait_s_median": statistics.median(t.data_wait_s for t in times),
            "slowest_rank": slowest,
            "slowest_host": self.hosts[slowest],
            "peak_memory_gb": max(
                (t.peak_memory_gb for t in times if t.peak_memory_gb is not None), default=None
            ),
        }
        straggling = len(times) > 1 and own[slowest] > (1 + self.margin) * median
        rank, count = self.slowest_run
        self.slowest_run = (slowest, count + 1 if rank == slowest else 1) if straggling else (-1, 0)
        warning = None
        if self.slowest_run[1] >= self.windows:
            warning = (
                f"straggler: rank {slowest} on {self.hosts[slowest]} has been the slowest for "
                f"{self.slowest_run[1]} windows: {own[slowest]:.2f} s of its own work (forward and "
                f"data wait) against a median of {median:.2f} s"
            )
        return record, warning


class SpikeDetector:
    """A logged window whose loss is above (1 + loss_factor) x the median of the last `history`
    windows, or whose gradient norm is above grad_factor x theirs. Quiet until `history` windows are
    known."""

    def __init__(self, loss_factor: float, grad_factor: float, history: int) -> None:
        self.loss_factor, self.grad_factor = loss_factor, grad_factor
        self.losses: deque[float] = deque(maxlen=history)
        self.grad_norms: deque[float] = deque(maxlen=history)

    def check(self, loss: float, grad_norm: float | None) -> dict[str, Any] | None:
        """The spike's figures, or None; then remembers this window. Each check has its own switch
        (factor 0)."""
        full = self.losses.maxlen
        median_loss = statistics.median(self.losses) if len(self.losses) == full else None
        median_grad = statistics.median(self.grad_norms) if len(self.grad_norms) == full else None
        loss_jump = (
            self.loss_factor > 0
            and median_loss is not None
            and loss > (1 + self.loss_factor) * median_loss
        )
        grad_jump = (self.grad_factor > 0 and grad_norm is not None and median_grad is not None
                     and grad_norm > self.grad_factor * median_grad)
        spike = None
        if loss_jump or grad_jump:
            spike = {"loss": loss, "median_loss": median_loss, "grad_norm": grad_norm,
                     "median_grad_norm": median_grad, "cause": "loss" if loss_jump else "grad_norm"}
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        return spike
