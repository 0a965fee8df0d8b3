"""What both loader backends share: the augmentation recipe, the loader spec and the `Loader` contract.

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

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.manifest import ShardSet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875

Backend = Literal["dali", "pil"]
Device = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend needs to build its reader; see `build_loader` for the meaning of each."""

    shards: ShardSet
    split: str
    local_batch_size: int
    img_size: int
    train: bool
    rank: int
    world_size: int
    seed: int
    device: Device  # resolved: never "auto"
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
            return (self.num_samples // self.world_size) // self.local_batch_size
        start, end = self.block(0)
        return -(-(end - start) // self.local_batch_size)

    def epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch * 7919 + 1) % (2**31 - 1)


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
                "rank": spec.rank, "world_size": spec.world_size, "local_batch_size": spec.local_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        spec = self.spec
        mine = (self.backend, spec.seed, spec.rank, spec.world_size, spec.local_batch_size)
        theirs = (state["backend"], state["seed"], state["rank"], state["world_size"], state["local_batch_size"])
        if mine != theirs:
            raise ValueError(f"loader state is for (backend, seed, rank, world size, local batch) = {theirs}, "
                             f"this loader is {mine}")
        self.epoch, self.position = state["epoch"], state["position"]

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _forget_position(self) -> None:
        """Drop backend state that only applies to the position being left."""
