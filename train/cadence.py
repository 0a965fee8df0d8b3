"""When periodic work is due: each answers "due now?" for one kind of work, so the training loop
only asks.

Steps count optimizer steps; epochs count finished epochs. A cadence of 0 is never due.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class EverySteps:
    """Due at every `steps`-th optimizer step (metric logging)."""

    steps: int

    def due(self, step: int) -> bool:
        return self.steps > 0 and step % self.steps == 0


@dataclass
class EveryEpochs:
    """Due when an epoch that is a multiple of `epochs` has just finished (k-NN, milestones,
    reconstructions)."""

    epochs: int

    def due(self, finished_epochs: int) -> bool:
        return self.epochs > 0 and finished_epochs % self.epochs == 0


@dataclass
class CheckpointCadence:
    """Due every `steps` optimizer steps or every `minutes` of wall clock since the last save,
    whichever comes first; `saved` restarts the clock. The steps are the same on every rank; each
    rank's clock is its own, so the trainer has the ranks vote on it
    (`train.distributed.StepVote`)."""

    steps: int
    minutes: float
    last_save: float = field(default_factory=time.monotonic)

    def due_by_steps(self, step: int) -> bool:
        return EverySteps(self.steps).due(step)

    def due_by_clock(self) -> bool:
        return self.minutes > 0 and time.monotonic() - self.last_save > 60 * self.minutes

    def saved(self) -> None:
        self.last_save = time.monotonic()
