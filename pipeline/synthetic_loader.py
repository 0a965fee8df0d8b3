"""Synthetic data: random images made on the device, normalized as the real loaders' output, no
decoding.

For measuring the trainer alone (its overhead, MFU and memory) before DALI is even installed, and
for telling a data bottleneck from a model one on a user's own cluster: if training on synthetic
data is no faster than on the shards, the data path is not what holds the run back. The epoch plan,
batch counts, positions and resume are the real loaders', over a virtual split of
`synthetic_samples` samples in one shard; sample i has label i mod 1000 (there is nothing to learn).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.loader_base import IMAGENET_MEAN, IMAGENET_STD, Batch, Loader, LoaderSpec
from pipeline.loader_state import ReadPosition

IMAGENET_CLASSES = 1000
# what a virtual split, and --print-config without data, stands in for
IMAGENET_TRAIN_SAMPLES = 1_281_167
SYNTHETIC_CLASSES = IMAGENET_CLASSES


class SyntheticTable:
    """The sample table of a virtual split: one shard of `samples` samples, whose keys are made on
    demand ("synthetic00000042": a split of a million names need not be stored)."""

    def __init__(self, samples: int) -> None:
        self.shard_sizes = [samples]

    def __len__(self) -> int:
        return self.shard_sizes[0]

    def keys(self, samples: np.ndarray) -> list[str]:
        return [f"synthetic{int(i):08d}" for i in samples]


class SyntheticLoader(Loader):
    backend = "synthetic"

    def __init__(self, spec: LoaderSpec, samples: int) -> None:
        super().__init__(spec, SyntheticTable(samples))
        device = "cuda" if spec.device == "gpu" else "cpu"
        self._device = torch.device(device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def _epoch_batches(self, position: ReadPosition) -> Iterator[Batch]:
        b, size = self.spec.local_batch_size, self.spec.img_size
        samples = self.samples(position)
        generator = torch.Generator(device=self._device)
        for batch in range(position.batch, -(-len(samples) // b)):
            ids = samples[batch * b:(batch + 1) * b]
            # Each batch from its own seed: the same images at the same position, however it was
            # reached.
            generator.manual_seed(
                self.augmentation_seed(ReadPosition(position.epoch, batch, position.handed_over))
            )
            pixels = (
                torch.rand(len(ids), 3, size, size, device=self._device, generator=generator) * 255
            )
            labels = torch.from_numpy(ids % SYNTHETIC_CLASSES) if self.spec.labels else None
            # pinned: the copy does not hold the host up
            if labels is not None and self._device.type == "cuda":
                labels = labels.pin_memory().to(self._device, non_blocking=True)
            yield ((pixels - self._mean) / self._std).to(self.spec.dtype), labels
