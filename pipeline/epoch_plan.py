"""Which samples each rank reads in an epoch, and in what order: one rule for both backends.

Training reads the shards in a new random order every epoch and each shard's samples in a new random
order. The builder already spread the data set over the shards at random, so a shard is a random
sample of it and its samples can be read together (a tar is read as one piece, as DALI's reader
wants). Rank r of W takes the r-th contiguous block of that order; every rank gets the same number
of full batches, so a few samples at block ends wait for the next epoch. Evaluation reads the stored
order, every sample exactly once across ranks.

An epoch can change hands: a run stopped after every rank of W read b batches of B, and resumed on
W' ranks, continues with what the first segment left, split into W' blocks (`Spans.unread_after`).
A loader's place in all this is one value, its `ReadPosition` (`pipeline.loader_state`). The orders
come from the data seed's named streams (`pipeline.seeds`); their rule's version, `ORDER_RULE`, is
kept in every loader state.

A rank computes only its own part (`EpochPlan.rank_samples`): the shard order (a term per shard),
which places of the epoch's order its block covers after the hand-overs (a few runs per hand-over
rank), and the sample order of just the shards those places fall in. Nothing the size of the whole
data set is made, so a rank of 512 over 2 billion samples plans its epoch as fast as it plans a
share of ImageNet (`bench pipeline` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.loader_state import ReadPosition, Segment
from pipeline.seeds import stream


def shard_order(shard_count: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch reads the shards."""
    return stream(seed, "shard order", epoch).permutation(shard_count)


def order_in_shard(size: int, seed: int, epoch: int, shard: int) -> np.ndarray:
    """The order in which an epoch reads shard `shard`'s samples: its own generator, so that a rank
    orders only the shards it reads."""
    return stream(seed, "order in shard", epoch, shard).permutation(size)


def whole_epoch_order(shard_sizes: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Every sample of a training epoch in reading order: the rule written out whole, 8 bytes per
    sample of the data set. No rank computes it; tests and benchmarks hold `EpochPlan.rank_samples`
    against it."""
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    first = np.cumsum(sizes) - sizes
    pieces = [
        first[s] + order_in_shard(int(sizes[s]), seed, epoch, s)
        for s in shard_order(len(sizes), seed, epoch)
    ]
    return np.concatenate([np.zeros(0, np.int64), *pieces])


def train_batches_per_rank(samples: int, world_size: int, local_batch_size: int) -> int:
    """Full batches every rank reads in training: as many on every rank, so the smallest block
    decides."""
    return (samples // world_size) // local_batch_size


@dataclass(frozen=True)
class Spans:
    """A sequence of epoch-order places (0 = the epoch's first sample), as runs: run i holds the
    places `starts[i]` .. `starts[i] + lengths[i] - 1`. What is left of an epoch after hand-overs is
    a few runs per rank."""

    starts: np.ndarray
    lengths: np.ndarray

    @staticmethod
    def whole(samples: int) -> Spans:
        return Spans(np.array([0], dtype=np.int64), np.array([samples], dtype=np.int64))

    @staticmethod
    def joined(parts: list[Spans]) -> Spans:
        return Spans(
            np.concatenate([p.starts for p in parts]), np.concatenate([p.lengths for p in parts])
        )

    def __len__(self) -> int:
        return int(self.lengths.sum())

    def take(self, first: int, stop: int) -> Spans:
        """Items `first` .. `stop` - 1 of the sequence."""
        ends = np.cumsum(self.lengths)
        begins = ends - self.lengths
        front = np.clip(first - begins, 0, self.lengths)
        back = np.clip(ends - stop, 0, self.lengths)
        lengths = self.lengths - front - back
        kept = lengths > 0
        return Spans(self.starts[kept] + front[kept], lengths[kept])

    def unread_after(self, segment: Segment) -> Spans:
        """The sequence without what `segment` read: each of its ranks the start of its block."""
        n, world, read = len(self), segment.world_size, segment.batches * segment.local_batch_size
        return Spans.joined(
            [self.take(n * r // world + read, n * (r + 1) // world) for r in range(world)]
        )


@dataclass(frozen=True)
class EpochPlan:
    """Which samples (their row in shard order) each rank reads in an epoch, computed from the shard
    sizes alone, in time and memory that follow the rank's own share plus a term per shard."""

    shard_sizes: np.ndarray
    seed: int
    # shuffled, and full batches only, as training reads; else the stored order, every sample
    train: bool
    # only the first `limit` samples of the stored order (evaluation subsets)
    limit: int | None = None

    def rank_samples(
        self, position: ReadPosition, rank: int, world_size: int, local_batch_size: int
    ) -> np.ndarray:
        """The samples rank `rank` of `world_size` reads from the last hand-over of `position`'s
        epoch on, in reading order: the rank-th contiguous block of what the hand-overs left (DALI's
        sharding rule), in training cut to the full batches every rank has."""
        total = int(self.shard_sizes.sum())
        left = Spans.whole(total if self.limit is None else min(self.limit, total))
        for segment in position.handed_over:
            left = left.unread_after(segment)
        n = len(left)
        first, stop = n * rank // world_size, n * (rank + 1) // world_size
        if self.train:
            stop = (
                first + train_batches_per_rank(n, world_size, local_batch_size) * local_batch_size
            )
        return self.samples_at(left.take(first, stop), position.epoch)

    def samples_at(self, places: Spans, epoch: int) -> np.ndarray:
        """The samples at epoch-order `places`: in training a shard after another in `shard_order`,
        each shard's samples in `order_in_shard`; in evaluation the stored order."""
        if not self.train:
            runs = map(np.arange, places.starts, places.starts + places.lengths)
            return np.concatenate([np.zeros(0, np.int64), *runs])
        sizes = self.shard_sizes
        first_row = np.cumsum(sizes) - sizes
        shards = shard_order(len(sizes), self.seed, epoch)
        # epoch-order place where each shard, in reading order, ends
        ends = np.cumsum(sizes[shards])
        orders: dict[int, np.ndarray] = {}
        pieces = [np.zeros(0, np.int64)]
        for start, length in zip(places.starts.tolist(), places.lengths.tolist(), strict=True):
            place, stop = start, start + length
            k = int(np.searchsorted(ends, place, side="right"))
            while place < stop:
                shard = int(shards[k])
                begin = int(ends[k]) - int(sizes[shard])
                if shard not in orders:
                    orders[shard] = order_in_shard(int(sizes[shard]), self.seed, epoch, shard)
                end = min(stop, int(ends[k]))
                pieces.append(first_row[shard] + orders[shard][place - begin:end - begin])
                place, k = end, k + 1
        return np.concatenate(pieces)
