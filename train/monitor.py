"""What watches a run and writes it down, beside the loop (`train.trainer`): the hang watchdog and
stacks on demand, each rank's own time and the straggler warning, the loss-spike detector, the
device-side metric window, the profiler, the progress bar or the log file's line, the sample log,
and the lines a rank prints.

The trainer tells it what happened (a forward pass and its loss, an optimizer step, a logged window,
a slow phase); it keeps the time and the figures. Its collectives (a window's reduction, the ranks'
figures) run at log steps only.
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from model.flops import peak_flops
from train.cadence import EverySteps
from train.config import RunConfig
from train.health import RankTimes, SpikeDetector, Watchdog, dump_stacks_on
from train.metrics import MetricsLog, MetricWindow
from train.profiling import step_profiler, write_profile


class RunMonitor:
    """One rank's watch over its run. Built when the rank joins (a hang in set-up is a hang too);
    `begin` adds what needs the built run (its length, its model's FLOPs)."""

    def __init__(self, cfg: RunConfig, output: Path, rank: int, device: torch.device, control: Any,
                 hosts: list[str], resources: contextlib.ExitStack) -> None:
        self.cfg, self.output, self.rank, self.device, self.resources = (
            cfg,
            output,
            rank,
            device,
            resources,
        )
        self.is_main = rank == 0
        self.step = 0  # the last optimizer step the trainer reported (what a hang report names)
        self.watchdog = Watchdog(cfg.runtime.hang_timeout_s, output, rank, lambda: self.step)
        resources.callback(self.watchdog.close)
        stacks = dump_stacks_on(signal.SIGUSR1, output, rank)
        resources.callback(stacks.close)
        resources.callback(faulthandler.unregister, signal.SIGUSR1)
        log = cfg.log
        self.rank_times = RankTimes(
            device, control, hosts, log.straggler_margin, log.straggler_windows
        )
        self.spikes = SpikeDetector(log.spike_loss_factor, log.spike_grad_factor, log.spike_history)
        self.logging = EverySteps(log.log_every)
        self.window = MetricWindow(device)
        # A terminal gets a progress bar; a log file (SLURM's) a plain line per logged window
        # instead.
        self.plain_lines = self.is_main and not sys.stderr.isatty()

    def begin(
        self, first_step: int, last_step: int, flops_per_image: int, metrics: MetricsLog
    ) -> None:
        """The run is built: its steps `first_step` to `last_step`, each image's FLOPs (for MFU),
        its records."""
        cfg, hold = self.cfg, self.resources
        self.step, self.last_step, self.flops_per_image, self.metrics = (
            first_step,
            last_step,
            flops_per_image,
            metrics,
        )
        named = (
            peak_flops(torch.cuda.get_device_name(self.device))
            if self.device.type == "cuda"
            else None
        )
        self.peak_flops = cfg.log.peak_tflops * 1e12 or named
        self.sample_log = self._open_sample_log() if cfg.log.sample_ids else None
        self.profiler = None
        if cfg.log.profile_steps:
            write = write_profile(self.output) if self.is_main else lambda table: None
            self.profiler = hold.enter_context(
                step_profiler(cfg.log.profile_steps, self.device, write)
            )
        self.bar = tqdm(total=last_step, initial=first_step, unit="step", dynamic_ncols=True,
                        disable=not self.is_main or self.plain_lines)
        hold.callback(self.bar.close)

    def _open_sample_log(self) -> TextIO:
        """OUTPUT/samples/rank<r>.txt: one line per local batch, `<optimizer step> <sample
        keys...>`."""
        folder = self.output / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        return self.resources.enter_context(open(folder / f"rank{self.rank:05d}.txt", "a"))

    # ---------------------------------------------------------------- what the loop reports

    @contextlib.contextmanager
    def forward(self, step: int, keys: list[str] | None) -> Iterator[None]:
        """A forward pass of optimizer step `step` (its batch's sample keys, for the sample log):
        its time is this rank's own work."""
        if self.sample_log is not None and keys is not None:
            self.sample_log.write(f"{step} {' '.join(keys)}\n")
        with self.rank_times.forward():
            yield

    def add_loss(self, loss: torch.Tensor, step: int) -> None:
        self.window.add(loss, step)

    def step_done(self, step: int) -> None:
        """Optimizer step `step` is done: the watchdog, the profiler, the window and the bar hear of
        it."""
        self.step = step
        self.watchdog.beat()
        if self.profiler is not None:
            self.profiler.step()
        self.window.steps += 1
        self.bar.update(1)

    def log_due(self, step: int) -> bool:
        return self.logging.due(step)

    def slow_phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Work that may legitimately take longer than a step (a checkpoint, an evaluation), named
        in hang reports."""
        return self.watchdog.slow_phase(name)

    def flush(self) -> None:
        """What a checkpoint must find on the disk with it: the sample log's lines of its steps."""
        if self.sample_log is not None:
            self.sample_log.flush()

    # ---------------------------------------------------------------- a logged window

    def restart_window(self, loader_wait_s: float) -> None:
        self.window.restart(loader_wait_s)

    def reduce(self) -> tuple[float, int | None]:
        """Collective: the window's mean loss over all ranks, and its first non-finite step (or
        None)."""
        return self.window.reduce()

    def record(
        self,
        state: Any,
        loss: float,
        lr: float,
        grad_norm: float | None,
        loader_wait_s: float,
        global_batch_size: int,
        world_size: int,
    ) -> dict[str, Any] | None:
        """Collective: the window's record (every rank's figures gathered) and its line; the loss
        spike it shows, or None. `state`: the run's step, epoch and samples."""
        window = self.window
        elapsed = time.perf_counter() - window.started
        img_per_s = window.steps * global_batch_size / elapsed
        data_wait_s = loader_wait_s - window.wait_at_start
        ranks, straggler = self.rank_times.gather(data_wait_s)
        mfu = (
            None
            if self.peak_flops is None
            else self.flops_per_image * img_per_s / self.peak_flops / world_size
        )
        self.metrics.record(
            {
                "step": state.step,
                "epoch": state.epoch,
                "samples": state.samples,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "img_per_s": img_per_s,
                "data_stall_pct": 100 * data_wait_s / elapsed,
                "mfu": mfu,
                "step_time_s": elapsed / window.steps,
                **ranks,
            }
        )
        if self.plain_lines:
            print(self.line(state, loss, lr, grad_norm, img_per_s, 100 * data_wait_s / elapsed,
                            ranks.get("peak_memory_gb"), elapsed / window.steps), flush=True)
        elif self.is_main:
            self.bar.set_postfix(epoch=state.epoch, loss=f"{loss:.4f}", img_s=f"{img_per_s:.0f}")
        if straggler:
            self.say(straggler)
        window.restart(loader_wait_s)
        return self.spikes.check(loss, grad_norm)

    def line(
        self,
        state: Any,
        loss: float,
        lr: float,
        grad_norm: float | None,
        img_per_s: float,
        stall_pct: float,
        memory_gb: float | None,
        step_s: float,
    ) -> str:
        """The line a log file gets per window: when, where the run is, how it learns, how fast,
        when it ends."""
        eta = timedelta(seconds=round(step_s * (self.last_step - state.step)))
        parts = [
            time.strftime("%Y-%m-%d %H:%M:%S"),
            f"step {state.step}/{self.last_step}",
            f"epoch {state.epoch}",
            f"loss {loss:.4f}",
            f"lr {lr:.3g}",
            f"grad {grad_norm:.3g}" if grad_norm is not None else "",
            f"{img_per_s:.0f} img/s",
            f"stall {stall_pct:.0f}%",
            f"mem {memory_gb:.1f} GB" if memory_gb is not None else "",
            f"eta {eta}",
        ]
        return " ".join(part for part in parts if part)

    # ---------------------------------------------------------------- lines

    def say(self, line: str) -> None:
        """Rank 0 prints a line without breaking the progress bar."""
        if self.is_main:
            tqdm.write(line)

    def say_on_every_rank(self, line: str) -> None:
        """What one rank finds of itself (a compiler missing on its node), named by that rank."""
        tqdm.write(f"rank {self.rank}: {line}", file=sys.stderr)

    def close_bar(self) -> None:
        self.bar.close()
