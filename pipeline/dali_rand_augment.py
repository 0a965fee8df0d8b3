"""timm's RandAugment (`rand-m9-mstd0.5-inc1`'s op set and ranges,
`pipeline.augment.RAND_AUGMENT_OPS`) built from DALI's own `auto_aug` operators, for the fine-tuning
graph in `pipeline.dali_graph`."""

from __future__ import annotations

import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import augmentations as auto_aug_ops
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from nvidia.dali.data_node import DataNode

from pipeline.augment import MAGNITUDE_LEVELS, RAND_AUGMENT_OPS, Augmentation


# DALI's own equalize and sharpness call operator aliases DALI has deprecated (a warning on every
# pipeline build): the same ops on the current names.
@augmentation
def equalize(data: DataNode, _: object) -> DataNode:
    return fn.equalize(data)


@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=auto_aug_ops.sharpness_kernel,
              param_device="auto")
def sharpness(data: DataNode, kernel: DataNode) -> DataNode:
    return fn.filter(data, kernel)


CURRENT_NAMES = {"equalize": equalize, "sharpness": sharpness}


def rand_augment_suite(augment: Augmentation) -> list:
    """DALI's RandAugment ops set to `RAND_AUGMENT_OPS`'s ranges, the level scale of timm's (bin m
    of 11)."""
    suite = []
    for op in RAND_AUGMENT_OPS:
        dali_op = CURRENT_NAMES.get(op.dali_name) or getattr(auto_aug_ops, op.dali_name)
        # timm keeps 4 - int(4 x level / 10) bits: DALI's mask for that many
        if op.dali_name == "posterize":
            dali_op = dali_op.augmentation(
                (0, 4), mag_to_param=lambda m: auto_aug_ops.poster_mask_uint8(4 - int(m))
            )
        elif op.level0 is not None:
            dali_op = dali_op.augmentation((op.level0, op.level10), op.signed)
        suite.append(dali_op)
    return suite


def rand_augment(images: DataNode, augment: Augmentation) -> DataNode:
    """timm's RandAugment layers on uint8 HWC images: each layer applies, with probability p, one op
    drawn uniformly from the set, at the policy's level with timm's per-op noise
    (`magnitude_bins`)."""
    suite = rand_augment_suite(augment)
    shape = images.shape(dtype=types.FLOAT)[0:2]  # (H, W): translations are relative to it
    for _ in range(augment.rand_augment_layers):
        if fn.random.coin_flip(probability=augment.rand_augment_prob, dtype=types.BOOL):
            op = fn.random.uniform(values=list(range(len(suite))), dtype=types.INT32)
            images = select(
                suite,
                op,
                data=images,
                magnitude_bin=signed_bin(magnitude_bins(augment)),
                num_magnitude_bins=NOISY_BINS,
                shape=shape,
            )
    return images


BINS_PER_LEVEL = 10  # a noisy level is applied to a tenth of a level
NOISY_BINS = MAGNITUDE_LEVELS * BINS_PER_LEVEL + 1


def magnitude_bins(augment: Augmentation) -> DataNode:
    """Each sample's magnitude bin (of NOISY_BINS) for one layer: timm's level, gauss(magnitude,
    std) clipped to [0, 10] (`mstd0.5`: the paper's recipe), to a tenth of a level."""
    level = augment.rand_augment_magnitude + fn.random.normal(
        stddev=augment.rand_augment_magnitude_std
    )
    level = dmath.clamp(level, 0.0, float(MAGNITUDE_LEVELS))
    # DALI's cast rounds to the nearest bin
    return fn.cast(level * BINS_PER_LEVEL, dtype=types.INT32)
