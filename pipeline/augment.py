"""What a training loader does to each image, as data both backends read: the crop, and
fine-tuning's RandAugment.

Pre-training (He et al. 2021, A.1) uses a random resized crop of scale (0.2, 1) and a flip.
Fine-tuning (A.2) adds RandAugment "rand-m9-mstd0.5-inc1" (timm's policy string: two layers,
magnitude 9 of 10 with a noise of 0.5, the "increasing" op set, each layer applied with probability
0.5) over crops of scale (0.08, 1); random erasing and mixup/cutmix act on whole batches on the
device (`pipeline.batch_augment`).

`RAND_AUGMENT_OPS` is the op set with the range each magnitude spans from level 0 to level 10, in
timm's terms; the DALI graph builds its RandAugment from it and the PIL baseline runs timm's own,
and the tests hold both to it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RandAugmentOp:
    """One RandAugment op: timm's name, DALI's name, and its parameter at level 0 and at level 10
    (None: no parameter). `signed`: the parameter's distance from neutral is negated for half the
    images."""

    timm_name: str
    dali_name: str
    level0: float | None = None
    level10: float | None = None
    signed: bool = False


RAND_AUGMENT_OPS = (
    RandAugmentOp("AutoContrast", "auto_contrast"),
    RandAugmentOp("Equalize", "equalize"),
    RandAugmentOp("Invert", "invert"),
    RandAugmentOp("Rotate", "rotate", 0.0, 30.0, signed=True),  # degrees
    # bits kept: 4 - int(4 x level / 10)
    RandAugmentOp("PosterizeIncreasing", "posterize", 4.0, 0.0),
    # pixels at or above this are inverted
    RandAugmentOp("SolarizeIncreasing", "solarize", 256.0, 0.0),
    RandAugmentOp("SolarizeAdd", "solarize_add", 0.0, 110.0),  # added to pixels below 128
    # enhancement factor 1 +- this
    RandAugmentOp("ColorIncreasing", "color", 0.0, 0.9, signed=True),
    RandAugmentOp("ContrastIncreasing", "contrast", 0.0, 0.9, signed=True),
    RandAugmentOp("BrightnessIncreasing", "brightness", 0.0, 0.9, signed=True),
    RandAugmentOp("SharpnessIncreasing", "sharpness", 0.0, 0.9, signed=True),
    RandAugmentOp("ShearX", "shear_x", 0.0, 0.3, signed=True),
    RandAugmentOp("ShearY", "shear_y", 0.0, 0.3, signed=True),
    RandAugmentOp("TranslateXRel", "translate_x", 0.0, 0.45, signed=True),  # fraction of the side
    RandAugmentOp("TranslateYRel", "translate_y", 0.0, 0.45, signed=True),
)
MAGNITUDE_LEVELS = 10  # timm's magnitude scale: level 10 is the full range


@dataclass(frozen=True)
class Augmentation:
    """Per-image training augmentation; evaluation always resizes the shorter side and
    centre-crops."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # area range of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range of the crop
    rand_augment_layers: int = 0  # RandAugment layers per image (0 = off)
    rand_augment_magnitude: int = 9  # level of every op, of MAGNITUDE_LEVELS
    # timm's per-op noise on the level (std of a gaussian, clipped to [0, 10])
    rand_augment_magnitude_std: float = 0.5
    rand_augment_prob: float = 0.5  # probability each layer applies its op

    def timm_policy(self) -> str:
        """This RandAugment as timm's policy string (the PIL baseline's)."""
        return (f"rand-m{self.rand_augment_magnitude}-n{self.rand_augment_layers}-"
                f"mstd{self.rand_augment_magnitude_std}-p{self.rand_augment_prob}-inc1")


PRETRAIN = Augmentation()
FINETUNE = Augmentation(crop_scale=(0.08, 1.0), rand_augment_layers=2)
LINEAR_PROBE = Augmentation(crop_scale=(0.08, 1.0))
