"""What both loader backends share: the augmentation recipe, the loader spec and the `Loader`
contract.

Both backends read the same samples in the same order (`pipeline.epoch_plan`), so training and
benchmarks can swap them:
- every epoch each rank reads its block of a fresh shard-then-sample shuffle of the split; training
  drops what does not fill a batch and gives every rank the same number of batches; evaluation
  yields every sample of the split exactly once across ranks (the last batch partial);
- a fixed seed reproduces the stream; `set_epoch` moves on; `state_dict` captures the position
  mid-epoch (a `pipeline.loader_state.LoaderState`), and `load_state_dict` continues exactly there,
  or, on another number of ranks or another local batch size, continues the epoch with the samples
  not yet read, split over the new ranks;
- `wait_s` / `last_wait_s` tell how long the consumer waited for data (the data stall).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from pipeline.augment import PRETRAIN, Augmentation
from pipeline.epoch_plan import EpochPlan
from pipeline.loader_state import DataSet, LoaderState, ReadPosition
from pipeline.manifest import ShardSet
from pipeline.sample_table import SampleTable
from pipeline.seeds import stream_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_geometry(width: Any, height: Any, size: int, smaller: Any = min,
                  larger: Any = max) -> tuple[Any, Any, Any, Any]:
    """Evaluation's resize and centre crop, exactly as the reference's torchvision transforms place
    them: (resized width, resized height, crop left, crop top) for a `size` x `size` crop of a width
    x height image.

    The shorter side goes to int(size / crop fraction), the fraction 224/256 up to 224 and 1 above
    (Resize(448) + CenterCrop(448) at 448); the longer side is truncated as torchvision's Resize
    does, and the crop's offset is Python's round((resized - size) / 2), halves to even, as
    torchvision's CenterCrop rounds it. Written in + - * // % and comparisons alone, so that the
    DALI graph computes the same numbers from its per-sample shapes (`smaller`, `larger`: min and
    max of the number type)."""
    shorter = int(size / (224 / 256 if size <= 224 else 1.0))
    short, long = smaller(width, height), larger(width, height)
    resized_long = shorter * long // short
    portrait = width <= height  # 1 or 0: the width is the short side
    resized_width = portrait * shorter + (1 - portrait) * resized_long
    resized_height = portrait * resized_long + (1 - portrait) * shorter
    return (
        resized_width,
        resized_height,
        _half_to_even(resized_width - size),
        _half_to_even(resized_height - size),
    )


def _half_to_even(margin: Any) -> Any:
    """round(margin / 2) for a whole margin >= 0, an odd margin's half rounded to the even
    neighbour."""
    half = margin // 2
    return half + (margin % 2) * (half % 2)

Backend = Literal["dali", "pil", "synthetic"]
# images [B, 3, S, S], labels [B] (None when not wanted)
Batch = tuple[torch.Tensor, "torch.Tensor | None"]
Device = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend needs to build its reader; see `build_loader` for the meaning of
    each."""

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
    # deliver the labels (False: batches carry None, and no label is read or moved)
    labels: bool = True
    window_shards: int = 2  # DALI: about this many shards' batches per pipeline (and staged copies)


class Table(Protocol):
    """What the loader needs of a split: its shard sizes and its samples' keys (`SampleTable`,
    `SyntheticTable`)."""

    shard_sizes: list[int]

    def keys(self, samples: np.ndarray) -> list[str]: ...


class Loader:
    """Iterable over (images [B, 3, S, S], labels [B] or None) for the current epoch; subclasses
    yield batches.

    Its place in the data is one value, `position` (a `ReadPosition`): set_epoch, each batch handed
    out, the end of an epoch and load_state_dict each move it by a named transition.
    """

    backend = "base"

    def __init__(self, spec: LoaderSpec, table: Table | None = None) -> None:
        self.spec = spec
        self.table = table or SampleTable(spec.shards)
        self.plan = EpochPlan(
            np.asarray(self.table.shard_sizes, dtype=np.int64), spec.seed, spec.train, spec.limit
        )
        self.position = ReadPosition()
        self.wait_s = 0.0
        self.last_wait_s = 0.0
        self._samples_cache: tuple[tuple, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self.position.epoch

    # ---------------------------------------------------------------- what this rank reads

    def samples(self, position: ReadPosition | None = None) -> np.ndarray:
        """Sample ids this rank reads from the hand-over of `position`'s epoch on (default: the
        current one)."""
        position = self.position if position is None else position
        key = (position.epoch, position.handed_over)
        # The next epoch's pipeline asks from another thread while batch_keys asks here: the cache
        # is read and replaced as one value, so a reader never takes one epoch's samples under
        # another's key.
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
        """Seeds one reading's random crops and flips: different per rank, epoch, hand-over and
        start batch (below 2**31: DALI's seeds are 32-bit)."""
        handovers = [v for s in position.handed_over for v in asdict(s).values()]
        indices = (position.epoch, self.spec.rank, position.batch, *handovers)
        return stream_seed(self.spec.seed, "augmentation", *indices) % (2**31 - 1)

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
                ended = (
                    f"{self.backend} reader ended after {self.position.batch} of {length} batches"
                )
                raise RuntimeError(ended) from None
            self.last_wait_s = time.perf_counter() - started
            self.wait_s += self.last_wait_s
            self.position = self.position.after_batch()
            yield images, labels
        batches.close()
        self._epoch_read()
        # iterating again replays this epoch; set_epoch moves on
        self.position = self.position.rewound()

    @property
    def data_set(self) -> DataSet:
        """What this loader's positions are positions in."""
        sizes = self.table.shard_sizes
        return DataSet.of(sizes, self.spec.seed, data_identity(self.spec.shards, sum(sizes)))

    def state_dict(self) -> LoaderState:
        spec = self.spec
        return LoaderState(
            self.position,
            self.data_set,
            spec.rank,
            spec.world_size,
            spec.local_batch_size,
            self.backend,
            self._exact_state(),
        )

    def load_state_dict(self, state: LoaderState) -> None:
        """Continue where `state` was taken: exactly, at the same rank count and local batch size
        (the same crops too, where the backend and rank match); otherwise with the rest of that
        epoch. A ValueError where it is a position in other data."""
        state.check_data(self.data_set)
        spec = self.spec
        self.position = state.position_on(spec.world_size, spec.local_batch_size)
        if self.position == state.position and (state.backend, state.rank) == (
            self.backend,
            spec.rank,
        ):
            self._restore_exactly(state)

    # ---------------------------------------------------------------- what a backend provides

    def _epoch_batches(self, position: ReadPosition) -> Iterator[Batch]:
        """Batches of this rank's `samples(position)` from batch `position.batch` on."""
        raise NotImplementedError

    def _exact_state(self) -> dict[str, Any] | None:
        """A backend whose augmentation has state (DALI's random generators) gives it here, for
        `self.position`."""
        return None

    def _restore_exactly(self, state: LoaderState) -> None:
        """...and takes it back here, for `state.position`."""

    def _epoch_read(self) -> None:
        """The epoch was read to its end: backends free what they held for it."""

    def close(self) -> None:
        """Free what the loader holds (pipelines, threads, scratch files) now rather than at exit;
        it reads no more."""
        self._epoch_read()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def data_identity(shards: ShardSet | None, samples: int) -> str:
    """What a reading position belongs to: the shards' fingerprint, or a synthetic split's size."""
    return shards.identity() if shards is not None else f"synthetic {samples}"
