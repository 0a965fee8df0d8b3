"""The DALI backend: webdataset reader -> fused decode+random-crop (GPU "mixed" or CPU) -> resize,
(fine-tuning's RandAugment,) flip, normalize, all inside one DALI pipeline per epoch, checkpointable mid-epoch.

The reader is given index files written for this rank and epoch: they list exactly the samples the
epoch plan gives this rank, in its order (DALI reads the members at the offsets an index names, in
the index's order), so no shuffle buffer is needed and nothing leaks from one epoch into the next.
While an epoch runs, the next epoch's pipeline is built and starts decoding in a background thread:
at the boundary its first batches are ready.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.auto_aug import augmentations as auto_aug_ops
from nvidia.dali.auto_aug.core import augmentation
from nvidia.dali.auto_aug.rand_augment import apply_rand_augment
from nvidia.dali.data_node import DataNode
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.augment import MAGNITUDE_LEVELS, RAND_AUGMENT_OPS, Augmentation
from pipeline.epoch_plan import ReadPosition
from pipeline.loader_base import (
    EVAL_CROP_FRACTION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Loader,
    LoaderSpec,
)
from pipeline.wds_format import INDEX_VERSION

# GPU decoding settings, from NVIDIA's ResNet-50 DALI recipe: nvJPEG's scratch buffers sized once
# for ImageNet-like JPEGs so they are not reallocated, and 65% of images on the hardware decoder.
HW_DECODER_LOAD = 0.65
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
PREFETCH_QUEUE_DEPTH = 2
_DAMAGED_HINT = "the shards are damaged: find the bad shard with `python -m pipeline.build_shards --verify DIR`"


def ascii_labels(padded: torch.Tensor) -> torch.Tensor:
    """[B, W] uint8 ASCII integers ("42", "-1" for unlabeled samples), zero-padded on the right -> int64 [B]."""
    negative = padded[:, 0] == ord("-")
    digits = padded.long() - ord("0")
    valid = (padded >= ord("0")) & (padded <= ord("9"))
    lengths = valid.sum(1, keepdim=True)
    place = lengths - 1 - torch.arange(padded.shape[1], device=padded.device) + negative.long().unsqueeze(1)
    value = (digits * valid * torch.pow(10, place.clamp_min(0))).sum(1)
    return torch.where(negative, -value, value)


# DALI's own equalize and sharpness call operator aliases DALI has deprecated (a warning on every pipeline build):
# the same ops on the current names.
@augmentation
def equalize(data: DataNode, _: object) -> DataNode:
    return fn.equalize(data)


@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=auto_aug_ops.sharpness_kernel,
              param_device="auto")
def sharpness(data: DataNode, kernel: DataNode) -> DataNode:
    return fn.filter(data, kernel)


CURRENT_NAMES = {"equalize": equalize, "sharpness": sharpness}


def rand_augment_suite(augment: Augmentation) -> list:
    """DALI's RandAugment ops set to `RAND_AUGMENT_OPS`'s ranges, the level scale of timm's (bin m of 11)."""
    suite = []
    for op in RAND_AUGMENT_OPS:
        dali_op = CURRENT_NAMES.get(op.dali_name) or getattr(auto_aug_ops, op.dali_name)
        if op.dali_name == "posterize":  # timm keeps 4 - int(4 x level / 10) bits: DALI's mask for that many
            dali_op = dali_op.augmentation((0, 4), mag_to_param=lambda m: auto_aug_ops.poster_mask_uint8(4 - int(m)))
        elif op.level0 is not None:
            dali_op = dali_op.augmentation((op.level0, op.level10), op.signed)
        suite.append(dali_op)
    return suite


def rand_augment(images: DataNode, augment: Augmentation) -> DataNode:
    """timm's RandAugment layers on uint8 HWC images: each layer applies, with probability p, one op drawn
    uniformly from the set, at the policy's level (DALI draws no per-op noise on the level)."""
    suite = rand_augment_suite(augment)
    shape = images.shape(dtype=types.FLOAT)[0:2]  # (H, W): translations are relative to it
    for _ in range(augment.rand_augment_layers):
        if fn.random.coin_flip(probability=augment.rand_augment_prob, dtype=types.BOOL):
            images = apply_rand_augment(suite, images, n=1, m=augment.rand_augment_magnitude,
                                        num_magnitude_bins=MAGNITUDE_LEVELS + 1, shape=shape)
    return images


@pipeline_def(enable_checkpointing=True, enable_conditionals=True)
def mae_pipeline(spec: LoaderSpec, tars: list[str], indexes: list[str], hw_decoder_load: float):
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
        images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB, **gpu_options)
        images = fn.resize(images, resize_shorter=int(size / EVAL_CROP_FRACTION), interp_type=types.INTERP_CUBIC,
                           antialias=True)
        mirror = 0
    # DALI has no bfloat16: half precision halves what leaves the pipeline, and the cast to bf16 is one
    # cheap pass on the device.
    low_precision = spec.dtype in (torch.float16, torch.bfloat16)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT16 if low_precision else types.FLOAT, output_layout="CHW",
        crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD], mirror=mirror,
    )
    return images, fn.pad(labels, fill_value=0)


@dataclass
class _Reading:
    """One pipeline reading this rank's samples of an epoch from `start` on, and the index files it reads."""

    start: ReadPosition
    iterator: DALIGenericIterator
    pipeline: Pipeline
    folder: Path
    consumed: int = 0  # batches handed out so far

    @property
    def position(self) -> ReadPosition:
        """The position its next batch continues from."""
        return replace(self.start, batch=self.start.batch + self.consumed)

    def close(self) -> None:
        # DALI's iterator and pipeline refer to each other, so dropping them frees nothing until the cycle
        # collector runs. Shutting the pipeline down frees its threads and buffers now, before the next
        # epoch allocates its own; a gc.collect() here cost about 100 ms at every epoch boundary. DALI has
        # no public call for this; where a version lacks the private one, the collector frees it later.
        shutdown = getattr(self.pipeline, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.iterator, self.pipeline
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class _ExactState:
    """DALI's own state at `position` (its random generators mid-epoch), from a checkpoint: it reproduces the
    rest of the epoch's crops exactly when the pipeline that started at `reading_start` is rebuilt with it."""

    position: ReadPosition
    reading_start: ReadPosition
    dali: str


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, spec: LoaderSpec, hw_decoder_load: float = HW_DECODER_LOAD) -> None:
        super().__init__(spec)
        self.hw_decoder_load = hw_decoder_load
        # Fixed here, in the caller's thread: CUDA's current device is per thread, and the next epoch
        # is built in another one.
        self._device_id = torch.cuda.current_device() if spec.device == "gpu" else None
        self._scratch = Path(tempfile.mkdtemp(prefix="maeflow-dali-"))
        weakref.finalize(self, shutil.rmtree, self._scratch, True)
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maeflow-next-epoch")
        weakref.finalize(self, self._background.shutdown, wait=False, cancel_futures=True)
        # Pipelines, not position: each knows the position it continues from, and is used only there.
        self._reading: _Reading | None = None  # the pipeline the last loop read from
        self._next_epoch: Future[_Reading] | None = None  # the next epoch's, being built in the background
        self._exact: _ExactState | None = None  # a checkpoint's DALI state, for the position it was taken at

    def _open(self, start: ReadPosition, checkpoint: str | None = None) -> _Reading:
        """A pipeline over this rank's samples from `start` on, its first batches decoding."""
        spec = self.spec
        samples = self.samples(start)[start.batch * spec.local_batch_size:]
        folder = Path(tempfile.mkdtemp(prefix=f"epoch{start.epoch:05d}-", dir=self._scratch))
        tars, indexes = self._write_indexes(samples, folder)
        pipe = mae_pipeline(
            spec, tars, indexes, self.hw_decoder_load, batch_size=spec.local_batch_size,
            num_threads=spec.num_threads, device_id=self._device_id, seed=self.augmentation_seed(start),
            prefetch_queue_depth=PREFETCH_QUEUE_DEPTH, checkpoint=checkpoint,
        )
        iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name="reader",
                                       last_batch_policy=LastBatchPolicy.PARTIAL)
        return _Reading(start, iterator, pipe, folder)

    def _write_indexes(self, samples: np.ndarray, folder: Path) -> tuple[list[str], list[str]]:
        """One (tar, index) pair per run of consecutive samples from the same shard."""
        shards = self.table.rows[samples, 0]
        cuts = np.flatnonzero(np.diff(shards)) + 1
        tars, indexes = [], []
        for number, run in enumerate(np.split(np.arange(len(samples)), cuts)):
            lines = self.table.index_lines(samples[run])
            index = folder / f"{number:06d}.idx"
            index.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n")
            tars.append(self.table.tars[int(shards[run[0]])])
            indexes.append(str(index))
        return tars, indexes

    def _reading_for(self, position: ReadPosition) -> _Reading:
        """The pipeline that continues at `position`; every other one is closed. The cases, in order:
        1. a checkpoint's DALI state for exactly this position: the interrupted reading, rebuilt with it;
        2. the pipeline the last loop stopped in mid-epoch, when it stopped here;
        3. the next epoch's, built ahead, at the start of that epoch;
        4. a new pipeline."""
        exact, self._exact = self._exact, None
        held = [r for r in (self._reading, self._next_epoch.result() if self._next_epoch else None) if r]
        self._reading = self._next_epoch = None
        if exact is not None and exact.position == position:
            chosen = self._open(exact.reading_start, exact.dali)
            chosen.consumed = position.batch - exact.reading_start.batch
        else:
            chosen = next((r for r in held if r.position == position), None) or self._open(position)
        for reading in held:
            if reading is not chosen:
                reading.close()
        return chosen

    def _epoch_batches(self, position: ReadPosition) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The reading outlives this generator when a consumer stops mid-epoch (a training loop that ends
        # or checkpoints): its DALI state is what makes the position exactly resumable.
        try:
            reading = self._reading = self._reading_for(position)
            if self.spec.train:  # build and fill the next epoch's pipeline now
                self._next_epoch = self._background.submit(self._open, ReadPosition(position.epoch + 1))
            for outputs in reading.iterator:
                images, labels = outputs[0]["images"], outputs[0]["labels"]
                labels = ascii_labels(labels).to(images.device, non_blocking=True)
                reading.consumed += 1
                yield images.to(self.spec.dtype), labels
        except RuntimeError as err:
            self._epoch_read()
            # DALI's decoder error does not say which sample failed: find it before reporting.
            culprit = (self.table.first_undecodable(self.samples(position))
                       or "no undecodable image found in this rank's samples")
            raise RuntimeError(f"DALI pipeline failed on {self.spec.split} shards ({culprit}): {err}\n"
                               f"{_DAMAGED_HINT}") from err

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        reading = self._reading
        if reading is not None and self.position.batch and reading.position == self.position:
            state["dali"] = reading.iterator.checkpoints()[0]
            state["dali_start"] = reading.start.batch
        return state

    def _restore_exactly(self, position: ReadPosition, state: dict[str, Any]) -> None:
        if "dali" in state:
            self._exact = _ExactState(position, replace(position, batch=state["dali_start"]), state["dali"])

    def _epoch_read(self) -> None:
        if self._reading is not None:
            self._reading.close()
            self._reading = None
