"""The DALI graph one rank reads an epoch through: webdataset reader -> fused decode+random-crop (GPU "mixed" or
CPU) -> resize, (fine-tuning's RandAugment,) flip, normalize; and the labels' ASCII decoding after it.

The graph reads the samples the index files name, in their order (`pipeline.dali_loader` writes them from the
epoch plan), so it shuffles nothing itself.
"""

from __future__ import annotations

import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode

from pipeline.dali_rand_augment import rand_augment
from pipeline.loader_base import IMAGENET_MEAN, IMAGENET_STD, LoaderSpec, eval_geometry

# GPU decoding settings, from NVIDIA's ResNet-50 DALI recipe: nvJPEG's scratch buffers sized once
# for ImageNet-like JPEGs so they are not reallocated, and 65% of images on the hardware decoder.
HW_DECODER_LOAD = 0.65
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
PREFETCH_QUEUE_DEPTH = 2


def ascii_labels(padded: torch.Tensor) -> torch.Tensor:
    """[B, W] uint8 ASCII integers ("42", "-1" for unlabeled samples), zero-padded on the right -> int64 [B]."""
    negative = padded[:, 0] == ord("-")
    digits = padded.long() - ord("0")
    valid = (padded >= ord("0")) & (padded <= ord("9"))
    lengths = valid.sum(1, keepdim=True)
    place = lengths - 1 - torch.arange(padded.shape[1], device=padded.device) + negative.long().unsqueeze(1)
    value = (digits * valid * torch.pow(10, place.clamp_min(0))).sum(1)
    return torch.where(negative, -value, value)


def center_crop(images: DataNode, size: int) -> DataNode:
    """Evaluation's resize and centre crop, per sample, with the geometry the PIL path and torchvision use
    (`eval_geometry`, computed here from each decoded image's shape)."""
    shape = images.shape(dtype=types.INT32)  # (H, W, C)
    width, height, left, top = eval_geometry(shape[1], shape[0], size, dmath.min, dmath.max)
    images = fn.resize(images, resize_x=fn.cast(width, dtype=types.FLOAT), resize_y=fn.cast(height, dtype=types.FLOAT),
                       interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.slice(images, start=fn.stack(top, left), shape=[size, size], axes=[0, 1])


@pipeline_def(enable_checkpointing=True, enable_conditionals=True)
def image_pipeline(spec: LoaderSpec, tars: list[str], indexes: list[str], hw_decoder_load: float):
    jpegs, labels = fn.readers.webdataset(
        paths=tars, index_paths=indexes, ext=["jpg", "cls"], missing_component_behavior="error",
        random_shuffle=False, pad_last_batch=True, name="reader",
    )
    decode = "mixed" if spec.device == "gpu" else "cpu"
    gpu_options = dict(hw_decoder_load=hw_decoder_load, device_memory_padding=DEVICE_MEMORY_PADDING,
                       host_memory_padding=HOST_MEMORY_PADDING) if decode == "mixed" else {}
    size = spec.img_size
    if spec.train:
        # Only the random window is decoded (ROI decoding), then resized to size x size.
        images = fn.decoders.image_random_crop(
            jpegs, device=decode, output_type=types.RGB, random_area=list(spec.augment.crop_scale),
            random_aspect_ratio=list(spec.augment.crop_ratio), num_attempts=10, **gpu_options,
        )
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
        if spec.augment.rand_augment_layers:
            images = rand_augment(images, spec.augment)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = center_crop(fn.decoders.image(jpegs, device=decode, output_type=types.RGB, **gpu_options), size)
        mirror = 0
    # DALI has no bfloat16: half precision halves what leaves the pipeline, and the cast to bf16 is one
    # cheap pass on the device.
    low_precision = spec.dtype in (torch.float16, torch.bfloat16)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT16 if low_precision else types.FLOAT, output_layout="CHW",
        mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD], mirror=mirror,
    )
    return images, fn.pad(labels, fill_value=0)
