"""The DALI graph one rank reads an epoch through: webdataset reader -> fused decode+random-crop
(GPU "mixed" or CPU) -> resize, (fine-tuning's RandAugment,) flip, normalize; and the labels' ASCII
decoding after it.

The graph reads the samples the index files name, in their order (`pipeline.dali_loader` writes them
from the epoch plan), so it shuffles nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode

from pipeline.dali_rand_augment import rand_augment
from pipeline.loader_base import IMAGENET_MEAN, IMAGENET_STD, LoaderSpec, eval_geometry

# 65% of the images on the A100/H100 hardware JPEG decoder, the rest on CUDA cores (DALI's default).
HW_DECODER_LOAD = 0.65
# nvJPEG's scratch buffers, reserved per decoder thread: one device buffer and two pinned host
# buffers (double buffering) each. DALI's defaults; a larger image grows its buffer once. NVIDIA's
# ResNet-50 recipe reserves 211 MB and 2 x 141 MB per thread instead, which at 16 threads and two
# pipelines is 6.8 GB of GPU memory and 9 GB of pinned host memory per rank.
DEVICE_MEMORY_PADDING = 16 * 2**20
HOST_MEMORY_PADDING = 8 * 2**20
PREFETCH_QUEUE_DEPTH = 2
# an epoch's pipeline and the next one's, built while the epoch runs (pipeline.dali_loader)
PIPELINES_ALIVE = 2


@dataclass(frozen=True)
class Reservation:
    """Memory a rank's DALI loader reserves up front for GPU decoding, which the model's own peak
    does not show."""

    gpu_bytes: int
    pinned_bytes: int

    def __str__(self) -> str:
        gpu, pinned = self.gpu_bytes / 2**20, self.pinned_bytes / 2**20
        return f"{gpu:.0f} MiB of GPU memory and {pinned:.0f} MiB of pinned host memory"


def reservation(threads: int) -> Reservation:
    """What the decoder's paddings reserve for one rank's loader of `threads` threads, both
    pipelines alive."""
    per_pipeline = Reservation(threads * DEVICE_MEMORY_PADDING, threads * 2 * HOST_MEMORY_PADDING)
    return Reservation(
        PIPELINES_ALIVE * per_pipeline.gpu_bytes, PIPELINES_ALIVE * per_pipeline.pinned_bytes
    )


def ascii_labels(padded: torch.Tensor) -> torch.Tensor:
    """[B, W] uint8 ASCII integers ("42", "-1" for unlabeled samples), zero-padded on the right ->
    int64 [B]."""
    negative = padded[:, 0] == ord("-")
    digits = padded.long() - ord("0")
    valid = (padded >= ord("0")) & (padded <= ord("9"))
    lengths = valid.sum(1, keepdim=True)
    place = (
        lengths
        - 1
        - torch.arange(padded.shape[1], device=padded.device)
        + negative.long().unsqueeze(1)
    )
    value = (digits * valid * torch.pow(10, place.clamp_min(0))).sum(1)
    return torch.where(negative, -value, value)


def center_crop(images: DataNode, size: int) -> DataNode:
    """Evaluation's resize and centre crop, per sample, with the geometry the PIL path and
    torchvision use (`eval_geometry`, computed here from each decoded image's shape)."""
    shape = images.shape(dtype=types.INT32)  # (H, W, C)
    width, height, left, top = eval_geometry(shape[1], shape[0], size, dmath.min, dmath.max)
    images = fn.resize(
        images,
        resize_x=fn.cast(width, dtype=types.FLOAT),
        resize_y=fn.cast(height, dtype=types.FLOAT),
        interp_type=types.INTERP_CUBIC,
        antialias=True,
    )
    return fn.slice(images, start=fn.stack(top, left), shape=[size, size], axes=[0, 1])


@pipeline_def(enable_checkpointing=True, enable_conditionals=True)
def image_pipeline(spec: LoaderSpec, tars: list[str], indexes: list[str], hw_decoder_load: float):
    """Images, and with `spec.labels` the labels: on the device when decoding is, so that no batch's
    labels cross from pageable host memory (a copy that would wait for the stream and cost the host
    its run-ahead)."""
    read = fn.readers.webdataset(
        paths=tars,
        index_paths=indexes,
        ext=["jpg", "cls"] if spec.labels else ["jpg"],
        missing_component_behavior="error",
        random_shuffle=False,
        pad_last_batch=True,
        name="reader",
    )
    jpegs = read[0] if spec.labels else read
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
        images = fn.resize(
            images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True
        )
        if spec.augment.rand_augment_layers:
            images = rand_augment(images, spec.augment)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = center_crop(
            fn.decoders.image(jpegs, device=decode, output_type=types.RGB, **gpu_options), size
        )
        mirror = 0
    # DALI has no bfloat16: half precision halves what leaves the pipeline, and the cast to bf16 is
    # one cheap pass on the device.
    low_precision = spec.dtype in (torch.float16, torch.bfloat16)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT16 if low_precision else types.FLOAT, output_layout="CHW",
        mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD], mirror=mirror,
    )
    if not spec.labels:
        return images
    labels = fn.pad(read[1], fill_value=0)
    return images, labels.gpu() if decode == "mixed" else labels
