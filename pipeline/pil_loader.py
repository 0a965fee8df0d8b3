"""The PIL baseline: what a user runs without DALI (PIL decoding in torch DataLoader workers).

It reads samples by random access through the DALI index files (tar offset and size per member),
which gives the same rank blocks, batch counts and exact mid-epoch resume as the DALI backend.
Augmentation follows torchvision's RandomResizedCrop rules with a per-sample generator seeded by
(seed, epoch, sample), so results do not depend on the number of workers.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.augment import Augmentation
from pipeline.errors import DamagedImage
from pipeline.loader_base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Batch,
    Loader,
    LoaderSpec,
    eval_geometry,
)
from pipeline.loader_state import ReadPosition
from pipeline.sample_table import Entries
from pipeline.seeds import stream
from pipeline.timm_ops import timm_data_module


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            augment: Augmentation) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop window (left, top, w, h): 10 tries, then a centre
    fallback."""
    area = width * height
    crop_ratio = augment.crop_ratio
    log_ratio = (math.log(crop_ratio[0]), math.log(crop_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*augment.crop_scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height
    if ratio < crop_ratio[0]:
        w, h = width, round(width / crop_ratio[0])
    elif ratio > crop_ratio[1]:
        w, h = round(height * crop_ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ShardSamples(Dataset):
    """Map-style view of one epoch's samples: item i -> (uint8 [3, S, S], label) of `entries`'
    sample i."""

    def __init__(self, spec: LoaderSpec, entries: Entries, epoch: int) -> None:
        self.entries, self.epoch = entries, epoch
        self.img_size, self.train, self.seed, self.augment = (
            spec.img_size,
            spec.train,
            spec.seed,
            spec.augment,
        )
        # made where it runs (a worker)
        self._rand_augment: Callable[[Image.Image], Image.Image] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        entries = self.entries
        try:
            img = Image.open(io.BytesIO(entries.jpeg(item))).convert("RGB")
        except Exception as err:
            raise DamagedImage(
                f"{entries.name(item)} does not decode ({err}); find damaged shards with "
                "`python -m pipeline.build_shards --verify DIR`"
            ) from err
        label = entries.label(item)
        size = self.img_size
        if self.train:
            rng = stream(self.seed, "pil augmentation", self.epoch, int(entries.samples[item]))
            left, top, w, h = random_resized_crop_box(img.width, img.height, rng, self.augment)
            img = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if self.augment.rand_augment_layers:
                # timm draws from the global generators: seeded per sample, the result is the same
                # on any workers.
                seed = int(rng.integers(2**31))
                random.seed(seed)
                np.random.seed(seed)
                if self._rand_augment is None:  # timm's ops are built in the process that runs them
                    self._rand_augment = rand_augment(self.augment, self.img_size)
                img = self._rand_augment(img)
        else:
            width, height, left, top = eval_geometry(img.width, img.height, size)
            img = img.resize((width, height), Image.BICUBIC).crop(
                (left, top, left + size, top + size)
            )
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label


def rand_augment(
    augment: Augmentation, img_size: int
) -> Callable[[Image.Image], Image.Image] | None:
    """timm's RandAugment for `augment` as the MAE fine-tuning recipe configures it (None when
    off)."""
    if not augment.rand_augment_layers:
        return None
    # magnitude_max: timm's noisy level reaches 10 in 2% of draws, where PosterizeIncreasing keeps 0
    # bits, which Pillow >= 11 refuses (older Pillow blanked the image); 9.99 keeps 1 bit and moves
    # every other op by 0.1%.
    hparams = {
        "translate_const": int(img_size * 0.45),
        "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
        "interpolation": Image.BICUBIC,
        "magnitude_max": 9.99,
    }
    return timm_data_module("auto_augment").rand_augment_transform(augment.timm_policy(), hparams)


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([img for img, _ in items]), torch.tensor(
        [label for _, label in items], dtype=torch.int64
    )


class PilLoader(Loader):
    backend = "pil"

    def __init__(self, spec: LoaderSpec) -> None:
        super().__init__(spec)
        device = "cuda" if spec.device == "gpu" else "cpu"
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def _epoch_batches(self, position: ReadPosition) -> Iterator[Batch]:
        b = self.spec.local_batch_size
        samples = self.samples(position)[position.batch * b:]
        # Located here, once: the workers inherit where every sample lies and read no index.
        dataset = ShardSamples(self.spec, self.table.entries(samples), position.epoch)
        plan = [list(range(i, min(i + b, len(samples)))) for i in range(0, len(samples), b)]
        # One thread decodes here, in this process. More decode in worker processes started from a
        # clean server
        # process: this one has threads (DALI's, the collectives', the run's watchdog), and a child
        # forked while one of them holds the interpreter's lock hangs at its start.
        workers = self.spec.num_threads if self.spec.num_threads > 1 else 0
        loader = DataLoader(dataset, batch_sampler=plan, num_workers=workers, collate_fn=_collate,
                            pin_memory=self.spec.device == "gpu",
                            multiprocessing_context="forkserver" if workers else None)
        for images, labels in loader:
            images = images.to(self._mean.device, non_blocking=True)
            images = ((images.float() - self._mean) / self._std).to(self.spec.dtype)
            yield (
                images,
                labels.to(self._mean.device, non_blocking=True) if self.spec.labels else None,
            )  # pinned
