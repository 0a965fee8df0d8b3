"""Which samples each rank reads in an epoch, and in what order: one rule for both backends.

Training reads the shards in a new random order every epoch and each shard's samples in a new random
order. The builder already spread the data set over the shards at random, so a shard is a random
sample of it and its samples can be read together (a tar is read as one piece, as DALI's reader
wants). Rank r of W takes the r-th contiguous block of that order; every rank gets the same number
of full batches, so a few samples at block ends wait for the next epoch. Evaluation reads the stored
order, every sample exactly once across ranks.

An epoch can change hands: a run stopped after every rank of W read b batches of B, and resumed on
W' ranks, continues with what the first segment left, split into W' blocks (`remaining_after`).
A loader's place in all this is one value, its `ReadPosition`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Part of an epoch read at one rank count: each of `world_size` ranks read `batches` batches of
    `local_batch_size` from the start of its block."""

    world_size: int
    local_batch_size: int
    batches: int


@dataclass(frozen=True)
class ReadPosition:
    """Where a rank is in the data: `batch` batches of `epoch` read since the epoch last changed hands, after
    the `handed_over` segments read at other rank counts or local batch sizes."""

    epoch: int = 0
    batch: int = 0
    handed_over: tuple[Segment, ...] = ()

    def at_epoch(self, epoch: int) -> ReadPosition:
        """Where reading `epoch` starts: here, if this is already a place in it; else its first batch."""
        return self if epoch == self.epoch else ReadPosition(epoch)

    def after_batch(self) -> ReadPosition:
        return replace(self, batch=self.batch + 1)

    def rewound(self) -> ReadPosition:
        """The epoch from its start again (at the hand-over, if it changed hands): an epoch read to its end
        and iterated again replays."""
        return replace(self, batch=0)

    def handed_to_new_ranks(self, world_size: int, local_batch_size: int) -> ReadPosition:
        """Where the new ranks start when a position taken on `world_size` ranks of `local_batch_size` moves to
        another rank count or batch size: the same epoch, after one more segment."""
        if not self.batch:
            return self
        return ReadPosition(self.epoch, 0, (*self.handed_over, Segment(world_size, local_batch_size, self.batch)))


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Global sample ids (their row in shard order) of one epoch, in reading order."""
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]]).astype(np.int64)
    if not shuffle:
        return np.arange(sum(shard_sizes), dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    pieces = [starts[s] + rng.permutation(shard_sizes[s]) for s in rng.permutation(len(shard_sizes))]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def block(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of `order` (DALI's sharding rule)."""
    n = len(order)
    return order[n * rank // world_size: n * (rank + 1) // world_size]


def train_batches_per_rank(samples: int, world_size: int, local_batch_size: int) -> int:
    """Full batches every rank reads in training: as many on every rank, so the smallest block decides."""
    return (samples // world_size) // local_batch_size


def rank_samples(order: np.ndarray, rank: int, world_size: int, local_batch_size: int, train: bool) -> np.ndarray:
    """The samples rank `rank` reads from `order`, in reading order: in training its full batches, in
    evaluation its whole block (the last batch partial)."""
    mine = block(order, rank, world_size)
    if train:
        return mine[: train_batches_per_rank(len(order), world_size, local_batch_size) * local_batch_size]
    return mine


def remaining_after(order: np.ndarray, segment: Segment) -> np.ndarray:
    """`order` without the samples `segment` read, in the same order."""
    n, world = len(order), segment.world_size
    read = np.zeros(n, dtype=bool)
    for rank in range(world):
        start = n * rank // world
        read[start: start + segment.batches * segment.local_batch_size] = True
    return order[~read]
