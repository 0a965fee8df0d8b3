"""Where a rank is in the data, as the one typed value a checkpoint keeps of a loader.

- `ReadPosition`: an epoch, the batches read of it, and the `Segment`s read before the epoch changed
hands (a run
  resumed on another rank count or local batch size). The loader moves it by named transitions.
- `DataSet`: what a position is a position in: the shards' identity and sizes, the data seed and the
rule that
  orders an epoch's samples. A position means nothing in another.
- `LoaderState`: a position, its data set, how it was read (ranks, local batch, backend) and, where
the backend has
  state of its own at exactly that position (DALI's random generators mid-epoch), that state, opaque
  here: the backend that wrote it reads it back (`pipeline.dali_loader`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from pipeline.formats import check_format, stamp

# The sample-order rule's version (`pipeline.epoch_plan`): a position means something only in the
# order it was taken in, so a position taken mid-epoch under another rule is refused.
ORDER_RULE = 3


@dataclass(frozen=True)
class Segment:
    """Part of an epoch read at one rank count: each of `world_size` ranks read `batches` batches of
    `local_batch_size` from the start of its block."""

    world_size: int
    local_batch_size: int
    batches: int


@dataclass(frozen=True)
class ReadPosition:
    """Where a rank is in the data: `batch` batches of `epoch` read since the epoch last changed
    hands, after the `handed_over` segments read at other rank counts or local batch sizes."""

    epoch: int = 0
    batch: int = 0
    handed_over: tuple[Segment, ...] = ()

    def at_epoch(self, epoch: int) -> ReadPosition:
        """Where reading `epoch` starts: here, if this is already a place in it; else its first
        batch."""
        return self if epoch == self.epoch else ReadPosition(epoch)

    def after_batch(self) -> ReadPosition:
        return replace(self, batch=self.batch + 1)

    def rewound(self) -> ReadPosition:
        """The epoch from its start again (at the hand-over, if it changed hands): an epoch read to
        its end and iterated again replays."""
        return replace(self, batch=0)

    def handed_to_new_ranks(self, world_size: int, local_batch_size: int) -> ReadPosition:
        """Where the new ranks start when a position taken on `world_size` ranks of
        `local_batch_size` moves to another rank count or batch size: the same epoch, after one more
        segment."""
        if not self.batch:
            return self
        return ReadPosition(
            self.epoch, 0, (*self.handed_over, Segment(world_size, local_batch_size, self.batch))
        )


@dataclass(frozen=True)
class DataSet:
    """What a reading position is a position in. The shard sizes are kept as their count, sum and
    digest: at a hundred thousand shards the sizes themselves would cost half a MB per rank per
    checkpoint."""

    identity: str
    """the shards' fingerprint (`ShardSet.identity`), or a synthetic split's size"""
    shards: int
    samples: int
    sizes_sha256: str
    seed: int
    order_rule: int = ORDER_RULE

    @staticmethod
    def of(shard_sizes: list[int], seed: int, identity: str) -> DataSet:
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        return DataSet(
            identity,
            len(sizes),
            int(sizes.sum()),
            hashlib.sha256(sizes.tobytes()).hexdigest()[:16],
            seed,
        )


@dataclass(frozen=True)
class LoaderState:
    position: ReadPosition
    data: DataSet
    rank: int
    world_size: int
    local_batch_size: int
    backend: str
    exact: dict[str, Any] | None = None
    """the backend's own state at exactly `position`, which reproduces the rest of the epoch's
    augmentation"""

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint's rank file holds (plain values: read back with
        torch.load(weights_only=True))."""
        return stamp("loader_state", asdict(self))

    @staticmethod
    def from_dict(raw: dict[str, Any], where: str) -> LoaderState:
        check_format("loader_state", raw, where)
        position = raw["position"]
        segments = tuple(Segment(**segment) for segment in position["handed_over"])
        return LoaderState(
            ReadPosition(position["epoch"], position["batch"], segments),
            DataSet(**raw["data"]),
            raw["rank"],
            raw["world_size"],
            raw["local_batch_size"],
            raw["backend"],
            raw["exact"],
        )

    def check_data(self, ours: DataSet) -> None:
        """A ValueError unless this position is a position in `ours`: the same data seed, the same
        shards and the same sample-order rule (a position at an epoch's start, where nothing of it
        was read, is one under any rule)."""
        theirs = self.data
        if theirs.seed != ours.seed:
            raise ValueError(
                f"loader state is for data seed {theirs.seed}, this loader has {ours.seed}: the "
                "epoch's sample order would differ"
            )
        if (theirs.shards, theirs.samples, theirs.sizes_sha256) != (
            ours.shards,
            ours.samples,
            ours.sizes_sha256,
        ):
            raise ValueError(
                f"loader state was taken on {theirs.samples} samples in {theirs.shards} shards, "
                f"these shards hold {ours.samples} in {ours.shards}: a position in one data set "
                "means nothing in another"
            )
        if theirs.identity != ours.identity:
            raise ValueError(
                "loader state was taken on other shards than these, with the same sizes (data "
                f"fingerprint {theirs.identity}, these shards {ours.identity}: rebuilt with "
                "another seed or from other images?): a position in one data set means nothing in "
                "another"
            )
        mid_epoch = self.position.batch or self.position.handed_over
        if theirs.order_rule != ours.order_rule and mid_epoch:
            raise ValueError(
                f"loader state was taken {self.position.batch} batches into epoch "
                f"{self.position.epoch} under sample-order rule {theirs.order_rule}, and this "
                f"maeflow orders an epoch's samples by rule {ours.order_rule}: the rest of that "
                "epoch would repeat some samples and skip others; resume from a checkpoint taken "
                "at an epoch's end, or finish the epoch with the maeflow that started it"
            )

    def position_on(self, world_size: int, local_batch_size: int) -> ReadPosition:
        """Where a loader of `world_size` ranks and `local_batch_size` continues: here, or, on
        another rank count or batch size, with the rest of this epoch handed over to the new
        ranks."""
        if (self.world_size, self.local_batch_size) == (world_size, local_batch_size):
            return self.position
        return self.position.handed_to_new_ranks(self.world_size, self.local_batch_size)
