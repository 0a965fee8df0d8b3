"""What both loader backends share: the augmentation recipe, the loader spec and the `Loader` contract.

Both backends read the same samples in the same order (`pipeline.epoch_plan`), so training and
benchmarks can swap them:
- every epoch each rank reads its block of a fresh shard-then-sample shuffle of the split; training
  drops what does not fill a batch and gives every rank the same number of batches; evaluation
  yields every sample of the split exactly once across ranks (the last batch partial);
- a fixed seed reproduces the stream; `set_epoch` moves on; `state_dict` captures the position
  mid-epoch, and `load_state_dict` continues exactly there, or, on another number of ranks or another
  local batch size, continues the epoch with the samples not yet read, split over the new ranks;
- `wait_s` / `last_wait_s` tell how long the consumer waited for data (the data stall).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from pipeline.augment import PRETRAIN, Augmentation
from pipeline.epoch_plan import ORDER_RULE, EpochPlan, ReadPosition, Segment
from pipeline.manifest import ShardSet
from pipeline.sample_table import SampleTable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_geometry(width: Any, height: Any, size: int, smaller: Any = min,
                  larger: Any = max) -> tuple[Any, Any, Any, Any]:
    """Evaluation's resize and centre crop, exactly as the reference's torchvision transforms place them:
    (resized width, resized height, crop left, crop top) for a `size` x `size` crop of a width x height image.

    The shorter side goes to int(size / crop fraction), the fraction 224/256 up to 224 and 1 above (Resize(448) +
    CenterCrop(448) at 448); the longer side is truncated as torchvision's Resize does, and the crop's offset is
    Python's round((resized - size) / 2), halves to even, as torchvision's CenterCrop rounds it. Written in + - *
    // % and comparisons alone, so that the DALI graph computes the same numbers from its per-sample shapes
    (`smaller`, `larger`: min and max of the number type)."""
    shorter = int(size / (224 / 256 if size <= 224 else 1.0))
    short, long = smaller(width, height), larger(width, height)
    resized_long = shorter * long // short
    portrait = width <= height  # 1 or 0: the width is the short side
    resized_width = portrait * shorter + (1 - portrait) * resized_long
    resized_height = portrait * resized_long + (1 - portrait) * shorter
    return resized_width, resized_height, _half_to_even(resized_width - size), _half_to_even(resized_height - size)


def _half_to_even(margin: Any) -> Any:
    """round(margin / 2) for a whole margin >= 0, an odd margin's half rounded to the even neighbour."""
    half = margin // 2
    return half + (margin % 2) * (half % 2)

Backend = Literal["dali", "pil", "synthetic"]
Batch = tuple[torch.Tensor, "torch.Tensor | None"]  # images [B, 3, S, S], labels [B] (None when not wanted)
Device = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend needs to build its reader; see `build_loader` for the meaning of each."""

    shards: ShardSet | None  # None for synthetic data
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
    limit: int | None = None  # read only the first `limit` samples of the split's stored order
    augment: Augmentation = PRETRAIN  # what training does to each image
    labels: bool = True  # deliver the labels (False: batches carry None, and no label is read or moved)


class Table(Protocol):
    """What the loader needs of a split: its shard sizes and its samples' keys (`SampleTable`, `SyntheticTable`)."""

    shard_sizes: list[int]

    def keys(self, samples: np.ndarray) -> list[str]: ...


class Loader:
    """Iterable over (images [B, 3, S, S], labels [B] or None) for the current epoch; subclasses yield batches.

    Its place in the data is one value, `position` (a `ReadPosition`): set_epoch, each batch handed out,
    the end of an epoch and load_state_dict each move it by a named transition.
    """

    backend = "base"

    def __init__(self, spec: LoaderSpec, table: Table | None = None) -> None:
        self.spec = spec
        self.table = table or SampleTable(spec.shards)
        self.plan = EpochPlan(np.asarray(self.table.shard_sizes, dtype=np.int64), spec.seed, spec.train, spec.limit)
        self.position = ReadPosition()
        self.wait_s = 0.0
        self.last_wait_s = 0.0
        self._samples_cache: tuple[tuple, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self.position.epoch

    # ---------------------------------------------------------------- what this rank reads

    def samples(self, position: ReadPosition | None = None) -> np.ndarray:
        """Sample ids this rank reads from the hand-over of `position`'s epoch on (default: the current one)."""
        position = self.position if position is None else position
        key = (position.epoch, position.handed_over)
        # The next epoch's pipeline asks from another thread while batch_keys asks here: the cache is read and
        # replaced as one value, so a reader never takes one epoch's samples under another's key.
        cached = self._samples_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        spec = self.spec
        mine = self.plan.rank_samples(position, spec.rank, spec.world_size, spec.local_batch_size)
        self._samples_cache = (key, mine)
        return mine

    def __len__(self) -> int:
        """Batches this rank reads in the current epoch (since its last change of hands)."""
        return -(-len(self.samples()) // self.spec.local_batch_size)

    def batch_keys(self, batch: int) -> list[str]:
        """Sample keys of batch `batch` of the current epoch (since its last change of hands)."""
        b = self.spec.local_batch_size
        return self.table.keys(self.samples()[batch * b:(batch + 1) * b])

    def augmentation_seed(self, position: ReadPosition) -> int:
        """Seeds one reading's random crops and flips: different per rank, epoch, hand-over and start batch."""
        handovers = [v for s in position.handed_over for v in asdict(s).values()]
        parts = [self.spec.seed, position.epoch, self.spec.rank, position.batch, *handovers]
        return int(np.random.default_rng(parts).integers(2**31 - 1))

    # ---------------------------------------------------------------- iteration and position

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch, unless a restored state already points into it."""
        self.position = self.position.at_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        length = len(self)
        batches = self._epoch_batches(self.position)
        while self.position.batch < length:
            started = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                ended = f"{self.backend} reader ended after {self.position.batch} of {length} batches"
                raise RuntimeError(ended) from None
            self.last_wait_s = time.perf_counter() - started
            self.wait_s += self.last_wait_s
            self.position = self.position.after_batch()
            yield images, labels
        batches.close()
        self._epoch_read()
        self.position = self.position.rewound()  # iterating again replays this epoch; set_epoch moves on

    @property
    def data_identity(self) -> str:
        return data_identity(self.spec.shards, sum(self.table.shard_sizes))

    def state_dict(self) -> dict[str, Any]:
        spec, position = self.spec, self.position
        return {"backend": self.backend, "epoch": position.epoch, "position": position.batch, "seed": spec.seed,
                "rank": spec.rank, "world_size": spec.world_size, "local_batch_size": spec.local_batch_size,
                "segments": [asdict(s) for s in position.handed_over], **sizes_summary(self.table.shard_sizes),
                "data": self.data_identity, "order_rule": ORDER_RULE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was taken: exactly, at the same rank count and local batch size (the
        same crops too, where the backend and rank match); otherwise with the rest of that epoch."""
        check_loader_state(state, self.spec.seed, self.table.shard_sizes, self.data_identity)
        saved = ReadPosition(state["epoch"], state["position"], tuple(Segment(**s) for s in state["segments"]))
        spec = self.spec
        if (state["world_size"], state["local_batch_size"]) == (spec.world_size, spec.local_batch_size):
            self.position = saved
            if (state["backend"], state["rank"]) == (self.backend, spec.rank):
                self._restore_exactly(saved, state)
        else:
            self.position = saved.handed_to_new_ranks(state["world_size"], state["local_batch_size"])

    # ---------------------------------------------------------------- what a backend provides

    def _epoch_batches(self, position: ReadPosition) -> Iterator[Batch]:
        """Batches of this rank's `samples(position)` from batch `position.batch` on."""
        raise NotImplementedError

    def _restore_exactly(self, position: ReadPosition, state: dict[str, Any]) -> None:
        """Backends whose augmentation has state (DALI's random generators) take it here, for `position`."""

    def _epoch_read(self) -> None:
        """The epoch was read to its end: backends free what they held for it."""

    def close(self) -> None:
        """Free what the loader holds (pipelines, threads, scratch files) now rather than at exit; it reads no more."""
        self._epoch_read()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def data_identity(shards: ShardSet | None, samples: int) -> str:
    """What a reading position belongs to: the shards' fingerprint, or a synthetic split's size."""
    return shards.identity() if shards is not None else f"synthetic {samples}"


def sizes_summary(shard_sizes: list[int]) -> dict[str, Any]:
    """What a loader state keeps of the shard sizes: their count, sum and digest. Not the sizes themselves: at a
    hundred thousand shards they would cost half a MB per rank per checkpoint."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    return {"shards": len(sizes), "samples": int(sizes.sum()),
            "sizes_sha256": hashlib.sha256(sizes.tobytes()).hexdigest()[:16]}


def check_loader_state(state: dict[str, Any], seed: int, shard_sizes: list[int], identity: str) -> None:
    """A ValueError unless a saved loader state is a position in exactly this data (`identity`: `data_identity`;
    states of older releases, which lack it, are checked by shard sizes alone), this data seed and this sample-order
    rule (a state at an epoch's start, where nothing of it was read, is a position under any rule)."""
    if state["seed"] != seed:
        raise ValueError(f"loader state is for data seed {state['seed']}, this loader has {seed}: the "
                         "epoch's sample order would differ")
    ours = sizes_summary(shard_sizes)
    theirs = {key: state[key] for key in ours} if "sizes_sha256" in state else sizes_summary(state["shard_sizes"])
    if theirs != ours:
        raise ValueError(f"loader state was taken on {theirs['samples']} samples in {theirs['shards']} shards, these "
                         f"shards hold {ours['samples']} in {ours['shards']}: a position in one data set means nothing "
                         "in another")
    if state.get("data", identity) != identity:
        raise ValueError(f"loader state was taken on other shards than these, with the same sizes (data fingerprint "
                         f"{state['data']}, these shards {identity}: rebuilt with another seed or from other images?): "
                         "a position in one data set means nothing in another")
    rule = state.get("order_rule", 1)
    if rule != ORDER_RULE and (state["position"] or state["segments"]):
        raise ValueError(f"loader state was taken {state['position']} batches into epoch {state['epoch']} under sample-"
                         f"order rule {rule}, and this maeflow orders an epoch's samples by rule {ORDER_RULE}: the "
                         "rest of that epoch would repeat some samples and skip others; resume from a checkpoint "
                         "taken at an epoch's end, or finish the epoch with the maeflow that started it")
