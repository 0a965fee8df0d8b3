"""The DALI backend: webdataset reader -> fused decode+random-crop (GPU "mixed" or CPU) -> resize,
flip, normalize, all inside one DALI pipeline per epoch, checkpointable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

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

# GPU decoding settings, from NVIDIA's ResNet-50 DALI recipe: nvJPEG's scratch buffers sized once
# for ImageNet-like JPEGs so they are not reallocated, and 65% of images on the hardware decoder.
HW_DECODER_LOAD = 0.65
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
PREFETCH_QUEUE_DEPTH = 2
# Shards are shuffled globally when built, so a small buffer suffices; it is filled at every epoch
# start, because each epoch gets a fresh pipeline: a pipeline kept across epochs carries samples of
# one rank's block into the next epoch, where another rank reads that block.
SHUFFLE_BUFFER = 1024
_DAMAGED_HINT = "the shards are damaged: find the bad shard with `python -m pipeline.build_shards --verify DIR`"


def ascii_labels(padded: torch.Tensor) -> torch.Tensor:
    """[B, W] uint8 ASCII digits, zero-padded on the right -> int64 [B]."""
    digits = padded.long() - ord("0")
    valid = (padded >= ord("0")) & (padded <= ord("9"))
    lengths = valid.sum(1, keepdim=True)
    place = lengths - 1 - torch.arange(padded.shape[1], device=padded.device)
    return (digits * valid * torch.pow(10, place.clamp_min(0))).sum(1)


@pipeline_def(enable_checkpointing=True)
def mae_pipeline(spec: LoaderSpec, shard_id: int, initial_fill: int):
    jpegs, labels = fn.readers.webdataset(
        paths=[str(p) for p in spec.shards.tars], index_paths=[str(p) for p in spec.shards.indexes],
        ext=["jpg", "cls"], missing_component_behavior="error", random_shuffle=spec.train,
        initial_fill=initial_fill, shard_id=shard_id, num_shards=spec.world_size, pad_last_batch=not spec.train,
        stick_to_shard=True, name="reader",
    )
    decode = "mixed" if spec.device == "gpu" else "cpu"
    gpu_options = dict(hw_decoder_load=HW_DECODER_LOAD, device_memory_padding=DEVICE_MEMORY_PADDING,
                       host_memory_padding=HOST_MEMORY_PADDING) if decode == "mixed" else {}
    size = spec.img_size
    if spec.train:
        # Only the random window is decoded (ROI decoding), then resized to size x size.
        images = fn.decoders.image_random_crop(
            jpegs, device=decode, output_type=types.RGB, random_area=list(CROP_SCALE),
            random_aspect_ratio=list(CROP_RATIO), num_attempts=10, **gpu_options,
        )
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB, **gpu_options)
        images = fn.resize(images, resize_shorter=int(size / EVAL_CROP_FRACTION), interp_type=types.INTERP_CUBIC,
                           antialias=True)
        mirror = 0
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT16 if spec.dtype == torch.float16 else types.FLOAT, output_layout="CHW",
        crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD], mirror=mirror,
    )
    return images, fn.pad(labels, fill_value=0)


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, spec: LoaderSpec) -> None:
        super().__init__(spec)
        self._checkpoint: str | None = None  # restored position, consumed by the next epoch start
        self._iterator: DALIGenericIterator | None = None

    def _build(self, epoch: int) -> DALIGenericIterator:
        spec = self.spec
        start, end = spec.block(epoch)
        pipe = mae_pipeline(
            spec, spec.shard_id(epoch), max(1, min(SHUFFLE_BUFFER, end - start)),
            batch_size=spec.local_batch_size, num_threads=spec.num_threads,
            device_id=torch.cuda.current_device() if spec.device == "gpu" else None,
            seed=spec.epoch_seed(epoch), prefetch_queue_depth=PREFETCH_QUEUE_DEPTH, checkpoint=self._checkpoint,
        )
        policy = LastBatchPolicy.DROP if spec.train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator(pipe, ["images", "labels"], reader_name="reader", last_batch_policy=policy)

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        restoring = self._checkpoint is not None
        try:
            self._iterator = self._build(epoch)
            self._checkpoint = None
            if start and not restoring:  # a position without a DALI checkpoint: replay up to it
                for _ in range(start):
                    next(self._iterator)
            for outputs in self._iterator:
                images, labels = outputs[0]["images"], outputs[0]["labels"]
                labels = ascii_labels(labels).to(images.device, non_blocking=True)
                if images.dtype != self.spec.dtype:
                    images = images.to(self.spec.dtype)
                yield images, labels
        except RuntimeError as err:
            # DALI's decoder error does not say which sample failed: find it before reporting.
            culprit = (SampleTable(self.spec.shards).first_undecodable(range(*self.spec.block(epoch)))
                       or "no undecodable image found in this rank's block")
            raise RuntimeError(f"DALI pipeline failed on {self.spec.split} shards ({culprit}): {err}\n"
                               f"{_DAMAGED_HINT}") from err
        finally:
            self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._iterator is not None and self.position:
            state["dali"] = self._iterator.checkpoints()[0]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._checkpoint = state.get("dali")

    def _forget_position(self) -> None:
        self._checkpoint = None
