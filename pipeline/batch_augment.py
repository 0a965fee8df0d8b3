"""Fine-tuning's batch-level augmentation, on the device that trains: random erasing, then mixup or
cutmix with label smoothing (He et al. 2021, A.2: erasing 0.25, mixup 0.8, cutmix 1.0, smoothing
0.1).

The semantics are timm's (RandomErasing in "pixel" mode, Mixup in "batch" mode), which the reference
fine-tuning code uses, and the tests compare them for the same random draws. The draws are a
function of (seed, step, rank), so a resumed run mixes exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ERASE_AREA = (0.02, 1 / 3)  # fraction of the image an erased box covers
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
ERASE_ATTEMPTS = 10


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float  # Beta(alpha, alpha) mixing weight for mixup (0 = off)
    cutmix_alpha: float  # Beta(alpha, alpha) area kept for cutmix (0 = off)
    switch_prob: float  # with both on: the probability a batch uses cutmix
    label_smoothing: float  # target mass spread evenly over all classes

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass(frozen=True)
class MixDraw:
    """One batch's draw: the weight of each image's own content, and the pasted box for cutmix."""

    lam: float
    # (top, bottom, left, right) rows and columns taken from the pair
    box: tuple[int, int, int, int] | None = None


def draw_mix(rng: np.random.Generator, height: int, width: int, mix: MixConfig) -> MixDraw:
    """A batch's mixup or cutmix draw, as timm's Mixup makes it (batch mode, correct_lam=True)."""
    use_cutmix = mix.cutmix_alpha > 0 and (mix.mixup_alpha == 0 or rng.random() < mix.switch_prob)
    if not use_cutmix:
        return MixDraw(float(rng.beta(mix.mixup_alpha, mix.mixup_alpha)))
    lam = float(rng.beta(mix.cutmix_alpha, mix.cutmix_alpha))
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return cutmix_draw(int(top), int(bottom), int(left), int(right), height, width)


def cutmix_draw(top: int, bottom: int, left: int, right: int, height: int, width: int) -> MixDraw:
    """A cutmix box, its weight corrected to the area actually pasted (the box may be clipped at an
    edge)."""
    return MixDraw(
        1.0 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right)
    )


def smooth_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with `smoothing` of the mass spread evenly over every class."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, draw: MixDraw, num_classes: int,
              smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image mixed with its partner in the reversed batch, and the soft targets that go with
    it."""
    partner = images.flip(0)
    if draw.box is None:
        # lam x images + (1 - lam) x partner, in one pass
        images = torch.lerp(partner, images, draw.lam)
    else:
        top, bottom, left, right = draw.box
        images = images.clone()
        images[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    targets = smooth_targets(labels, num_classes, smoothing)
    return images, targets * draw.lam + targets.flip(0) * (1.0 - draw.lam)


def erase_boxes(rng: np.random.Generator, count: int, height: int, width: int,
                prob: float) -> list[tuple[int, int, int, int, int]]:
    """timm's RandomErasing draws (one box, pixel mode) for `count` images: (image, top, left, h, w)
    for each image that gets a box. With probability `prob` an image gets one of 2-33% of its area
    and aspect ratio 0.3-3.3, the first of 10 tries that fits."""
    boxes = []
    for image in range(count):
        if rng.random() >= prob:
            continue
        for _ in range(ERASE_ATTEMPTS):
            area = rng.uniform(*ERASE_AREA) * height * width
            ratio = math.exp(rng.uniform(*ERASE_LOG_RATIO))
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if h < height and w < width:
                boxes.append(
                    (
                        image,
                        int(rng.integers(0, height - h + 1)),
                        int(rng.integers(0, width - w + 1)),
                        h,
                        w,
                    )
                )
                break
    return boxes


def random_erase(images: torch.Tensor, prob: float, rng: np.random.Generator,
                 generator: torch.Generator) -> torch.Tensor:
    """Random erasing in place: boxes drawn on the host (no device sync), filled on the device with
    N(0, 1) noise from `generator`, in normalized units; only the boxes' pixels are drawn."""
    _, channels, height, width = images.shape
    for image, top, left, h, w in erase_boxes(rng, images.shape[0], height, width, prob):
        images[image, :, top:top + h, left:left + w] = torch.randn(
            (channels, h, w), generator=generator, device=images.device, dtype=images.dtype)
    return images
