"""`build_loader`: shards -> normalized image batches, through DALI or the PIL baseline.

Both backends share one contract, so training and benchmarks can swap them:
- rank r of W reads a contiguous block of the global sample order (DALI's `shard_id/num_shards`
  rule); in training the block rotates with the epoch so ranks see different samples each epoch;
- training drops the last partial batch and gives every rank the same number of batches;
  evaluation yields every sample of the split exactly once across ranks (last batch partial);
- a fixed seed reproduces the stream; `set_epoch` changes it; `state_dict` captures the position
  mid-epoch so a resumed run continues with exactly the batches an uninterrupted one would see;
- `wait_s` / `last_wait_s` tell how long the consumer waited for data (the data stall).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.manifest import ShardSet, resolve_shards
from pipeline.wds_format import index_sample_count

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend needs to build its reader; see `build_loader` for the meaning of each."""

    shards: ShardSet
    split: str
    batch_size: int
    image_size: int
    train: bool
    rank: int
    world_size: int
    seed: int
    device: str  # "gpu" or "cpu", resolved
    num_threads: int
    dtype: torch.dtype
    num_samples: int  # in the whole split, all shards together

    def block(self, epoch: int) -> tuple[int, int]:
        """[start, end) of the global sample order this rank reads in `epoch` (DALI's sharding rule)."""
        shard = self.shard_id(epoch)
        n, w = self.num_samples, self.world_size
        return n * shard // w, n * (shard + 1) // w

    def shard_id(self, epoch: int) -> int:
        return (self.rank + epoch) % self.world_size if self.train else self.rank

    def batches_per_epoch(self) -> int:
        if self.train:  # the smallest block decides, so all ranks stay in step
            return (self.num_samples // self.world_size) // self.batch_size
        start, end = self.block(0)
        return -(-(end - start) // self.batch_size)

    def epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch * 7919 + 1) % (2**31 - 1)


def shard_sample_counts(shards: ShardSet) -> list[int]:
    """Samples per shard from the index headers (`v1.2 <count>`), checked against the manifest."""
    counts = []
    for idx in shards.indexes:
        if not idx.is_file():
            raise FileNotFoundError(f"index file {idx} is missing; rebuild the shards or run DALI's wds2idx on it")
        counts.append(index_sample_count(idx))
    if shards.manifest is not None:
        listed = {s.name: s.samples for s in shards.manifest.shards}
        for tar, count in zip(shards.tars, counts, strict=True):
            if listed.get(tar.name) != count:
                raise ValueError(f"{tar}: index lists {count} samples, the manifest {listed.get(tar.name)}")
    return counts


def ascii_labels(padded: torch.Tensor) -> torch.Tensor:
    """[B, W] uint8 ASCII digits, zero-padded on the right -> int64 [B]."""
    digits = padded.long() - ord("0")
    valid = (padded >= ord("0")) & (padded <= ord("9"))
    lengths = valid.sum(1, keepdim=True)
    place = lengths - 1 - torch.arange(padded.shape[1], device=padded.device)
    return (digits * valid * torch.pow(10, place.clamp_min(0))).sum(1)


class Loader:
    """Iterable over (images [B, 3, S, S], labels [B]) for the current epoch; subclasses yield batches."""

    backend = "base"

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self.wait_s = 0.0
        self.last_wait_s = 0.0
        self._length = spec.batches_per_epoch()

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch, unless a restored state already points into it."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
            self._forget_position()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._epoch_batches(self.epoch, self.position)
        while self.position < self._length:
            started = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                ended = f"{self.backend} reader ended after {self.position} of {self._length} batches"
                raise RuntimeError(ended) from None
            self.last_wait_s = time.perf_counter() - started
            self.wait_s += self.last_wait_s
            self.position += 1
            yield images, labels
        batches.close()
        self.position = 0  # iterating again replays this epoch; set_epoch moves on
        self._forget_position()

    def state_dict(self) -> dict[str, Any]:
        spec = self.spec
        return {"backend": self.backend, "epoch": self.epoch, "position": self.position, "seed": spec.seed,
                "rank": spec.rank, "world_size": spec.world_size, "batch_size": spec.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        spec = self.spec
        mine = (self.backend, spec.seed, spec.rank, spec.world_size, spec.batch_size)
        theirs = (state["backend"], state["seed"], state["rank"], state["world_size"], state["batch_size"])
        if mine != theirs:
            raise ValueError(f"loader state is for (backend, seed, rank, world size, batch) = {theirs}, "
                             f"this loader is {mine}")
        self.epoch, self.position = state["epoch"], state["position"]

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _forget_position(self) -> None:
        """Drop backend state that only applies to the position being left."""


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be auto, gpu or cpu, got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device='gpu' but torch sees no CUDA device")
    return device


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def build_loader(
    shards: str | Path,
    split: str = "train",
    batch_size: int = 64,
    image_size: int = 224,
    train: bool = True,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str = "auto",
    backend: str = "dali",
    num_threads: int | None = None,
    dtype: torch.dtype = torch.float32,
    verbose: bool = False,
) -> Loader:
    """A loader over `shards` (a shard folder with `<split>.json`, or a brace pattern of tars).

    train: RandomResizedCrop(image_size, scale (0.2, 1), ratio (3/4, 4/3), bicubic) + flip p=0.5;
    else resize the shorter side to image_size/0.875 (bicubic) and centre-crop. Images come
    normalized with the ImageNet mean/std, on the GPU when device="gpu". backend "dali" falls back
    to "pil" (with a message) where DALI is not installed. `num_threads` defaults to the CPU cores
    per local rank.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    if backend not in ("dali", "pil"):
        raise ValueError(f"backend must be dali or pil, got {backend!r}")
    if backend == "dali" and not dali_available():
        print("maeflow: DALI is not installed here; using the PIL backend")
        backend = "pil"
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = num_threads or max(1, (os.cpu_count() or 1) // local_ranks)
    shard_set = resolve_shards(shards, split)
    spec = LoaderSpec(shard_set, split, batch_size, image_size, train, rank, world_size, seed,
                      _resolve_device(device), threads, dtype, sum(shard_sample_counts(shard_set)))
    if spec.num_samples == 0:
        raise ValueError(f"{shards}: the {split} shards hold no samples")
    start, end = spec.block(0)
    if train and spec.batches_per_epoch() == 0:
        raise ValueError(f"batch size {batch_size} is larger than rank {rank}'s share of {end - start} samples "
                         f"({spec.num_samples} samples over {world_size} ranks)")
    if backend == "dali":
        from pipeline.dali_loader import DaliLoader as chosen
    else:
        from pipeline.pil_loader import PilLoader as chosen
    loader = chosen(spec)
    if verbose:
        print(f"maeflow: {backend} loader on {spec.device}, {len(loader)} batches of {batch_size} per epoch "
              f"for rank {rank}/{world_size}")
    return loader
