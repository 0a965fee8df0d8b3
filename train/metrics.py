"""What a run writes down: the device-side sums between log steps (`MetricWindow`), and rank 0's
records in OUTPUT/metrics.jsonl with their numbers in TensorBoard and W&B (`MetricsLog`)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

from train.dashboard import Board, WandbBoard


class MetricWindow:
    """Device-side sums between log steps, so the loop itself never synchronizes."""

    NO_BAD_STEP = 2**62

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.first_bad_step = torch.full((), self.NO_BAD_STEP, device=device, dtype=torch.int64)
        # where maeflow computes it: at the last scheduled log step
        self.grad_norm: torch.Tensor | None = None
        self.forward_passes = 0
        self.steps = 0
        self.started = time.perf_counter()
        self.wait_at_start = 0.0

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.loss_sum += loss.detach().double()
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(
            bad, torch.clamp(self.first_bad_step, max=step), self.first_bad_step
        )
        self.forward_passes += 1

    def reduce(self) -> tuple[float, int | None]:
        """(mean loss over all ranks, first non-finite step or None). A host sync and two
        all-reduces."""
        loss = self.loss_sum.clone()
        bad = self.first_bad_step.clone()
        dist.all_reduce(loss)
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        mean = loss.item() / max(1, self.forward_passes * dist.get_world_size())
        bad_step = int(bad.item())
        return mean, None if bad_step == self.NO_BAD_STEP else bad_step

    def restart(self, loader_wait_s: float) -> None:
        self.loss_sum.zero_()
        self.grad_norm = None
        self.forward_passes = self.steps = 0
        self.started = time.perf_counter()
        self.wait_at_start = loader_wait_s


class MetricsLog:
    """Rank 0's records: JSON lines in OUTPUT/metrics.jsonl and, for records with numbers, dashboard
    scalars (TensorBoard; W&B when `wandb_project` names a project, with `config` as the W&B run's
    config). Other ranks' calls do nothing, so every rank may call it."""

    def __init__(self, output: Path, is_main: bool, tensorboard: bool, wandb_project: str = "",
                 config: dict[str, Any] | None = None) -> None:
        self.output, self.is_main, self.tensorboard = output, is_main, tensorboard
        self.wandb_project, self.config = wandb_project, config or {}
        # opened at the first record: nothing before the run
        self._boards: list[Board | WandbBoard] | None = None

    @property
    def boards(self) -> list[Board | WandbBoard]:
        if self._boards is None:
            self._boards = [Board(self.output / "tb", self.tensorboard and self.is_main)]
            if self.wandb_project and self.is_main:
                self._boards.append(WandbBoard(self.output, self.wandb_project, self.config))
        return self._boards

    def record(self, record: dict[str, Any]) -> None:
        """A record of figures (a logged window, an evaluation): metrics.jsonl and the
        dashboards."""
        self.note(record)
        if self.is_main:
            for board in self.boards:
                board.scalars(record, record["step"])

    def image(self, name: str, picture: Image.Image, step: int) -> None:
        """A picture for the dashboards (rank 0)."""
        if self.is_main:
            for board in self.boards:
                board.image(name, picture, step)

    def note(self, record: dict[str, Any]) -> None:
        """An event (a resume, a loss spike): metrics.jsonl only, with the wall-clock time it was
        written (UTC)."""
        if self.is_main:
            written = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            with open(self.output / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**record, "time": written}) + "\n")

    def close(self) -> None:
        for board in self._boards or []:
            board.close()
