"""TensorBoard under OUTPUT/tb/ (rank 0): every metrics.jsonl number as a scalar, and the reconstruction
grids as images. Optional: without the tensorboard package the run says so once and goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class Board:
    def __init__(self, folder: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
        except ImportError:
            print("TensorBoard is not installed (pip install tensorboard): metrics go to metrics.jsonl only")
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def image(self, name: str, picture: Image.Image, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(name, np.asarray(picture), step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
