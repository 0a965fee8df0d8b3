"""The PIL baseline: what a user runs without DALI (PIL decoding in torch DataLoader workers).

It reads samples by random access through the DALI index files (tar offset and size per member),
which gives the same rank blocks, batch counts and exact mid-epoch resume as the DALI backend.
Augmentation follows torchvision's RandomResizedCrop rules with a per-sample generator seeded by
(seed, epoch, sample), so results do not depend on the number of workers.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.epoch_plan import ReadPosition
from pipeline.loader_base import (
    CROP_RATIO,
    CROP_SCALE,
    EVAL_CROP_FRACTION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Loader,
    LoaderSpec,
)
from pipeline.sample_table import SampleTable


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window (left, top, w, h): 10 tries, then a centre fallback."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ShardSamples(Dataset):
    """Map-style view of the shards: item (sample, epoch) -> (uint8 [3, S, S], label)."""

    def __init__(self, spec: LoaderSpec, table: SampleTable) -> None:
        self.table = table
        self.img_size, self.train, self.seed = spec.img_size, spec.train, spec.seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        sample, epoch = item
        try:
            img = Image.open(io.BytesIO(self.table.jpeg(sample))).convert("RGB")
        except Exception as err:
            raise RuntimeError(f"{self.table.name(sample)} does not decode ({err}); find damaged shards with "
                               "`python -m pipeline.build_shards --verify DIR`") from err
        label = self.table.label(sample)
        size = self.img_size
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, sample])
            left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
            img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            scale = int(size / EVAL_CROP_FRACTION) / min(img.width, img.height)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([img for img, _ in items]), torch.tensor([label for _, label in items], dtype=torch.int64)


class PilLoader(Loader):
    backend = "pil"

    def __init__(self, spec: LoaderSpec) -> None:
        super().__init__(spec)
        self.dataset = ShardSamples(spec, self.table)
        device = "cuda" if spec.device == "gpu" else "cpu"
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def _epoch_batches(self, position: ReadPosition) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.spec.local_batch_size
        samples = self.samples(position)[position.batch * b:]
        plan = [[(int(s), position.epoch) for s in samples[i:i + b]] for i in range(0, len(samples), b)]
        loader = DataLoader(self.dataset, batch_sampler=plan, num_workers=self.spec.num_threads,
                            collate_fn=_collate, pin_memory=self.spec.device == "gpu")
        for images, labels in loader:
            images = images.to(self._mean.device, non_blocking=True)
            images = ((images.float() - self._mean) / self._std).to(self.spec.dtype)
            yield images, labels.to(self._mean.device, non_blocking=True)
