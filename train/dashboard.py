"""Where rank 0's numbers are watched besides metrics.jsonl: TensorBoard under OUTPUT/tb/ and, when
a project is named, Weights & Biases. Each gets every metrics.jsonl number as a scalar and the
reconstruction grids as images. Both are optional: without the package the run says so once and goes
on."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.atomic import atomic_write_text


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's figures: what a dashboard plots (not the step, flags or texts)."""
    return {name: value for name, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step"}


class Board:
    def __init__(self, folder: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            # needs the optional tensorboard package
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print(
                "TensorBoard is not installed (pip install tensorboard): metrics go to "
                "metrics.jsonl only"
            )
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for name, value in numbers(record).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def image(self, name: str, picture: Image.Image, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(name, np.asarray(picture), step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbBoard:
    """One W&B run per output folder: its id is kept in OUTPUT/wandb_run_id, so a resumed or
    requeued run goes on in the same W&B run. WANDB_MODE=offline keeps it under OUTPUT/wandb/ for
    `wandb sync` (a node without network)."""

    def __init__(self, folder: Path, project: str, config: dict[str, Any]) -> None:
        self.run = None
        try:
            import wandb  # the optional wandb package
        except ImportError:
            print(
                "wandb is not installed (pip install 'maeflow[wandb]'): metrics go to "
                "metrics.jsonl and TensorBoard"
            )
            return
        id_file = folder / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            name=folder.name,
            dir=str(folder),
            config=config,
        )
        self._image, self._teardown = wandb.Image, wandb.teardown

    def scalars(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(numbers(record), step=step)

    def image(self, name: str, picture: Image.Image, step: int) -> None:
        if self.run is not None:
            self.run.log({name: self._image(picture)}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            # W&B's service process ends with the run, not at some exit hook after the trainer's
            self._teardown()
