"""Which samples each rank reads in an epoch, and in what order: one rule for both backends.

Training reads the shards in a new random order every epoch and each shard's samples in a new random
order. The builder already spread the data set over the shards at random, so a shard is a random
sample of it and its samples can be read together (a tar is read as one piece, as DALI's reader
wants). Rank r of W takes the r-th contiguous block of that order; every rank gets the same number
of full batches, so a few samples at block ends wait for the next epoch. Evaluation reads the stored
order, every sample exactly once across ranks.

An epoch can change hands: a run stopped after every rank of W read b batches of B, and resumed on
W' ranks, continues with what the first segment left, split into W' blocks (`remaining_after`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Part of an epoch read at one rank count: each of `world_size` ranks read `batches` batches of
    `local_batch_size` from the start of its block."""

    world_size: int
    local_batch_size: int
    batches: int


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
