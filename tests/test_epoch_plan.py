"""The epoch plan: which samples each rank reads, in what order, and how an epoch changes hands. Pure numpy
rules first, then the same rules through a real loader's state (PIL backend: no decoding needed to count)."""

import itertools

import numpy as np
import pytest

from pipeline import build_loader
from pipeline.epoch_plan import ReadPosition, Segment, epoch_order, rank_samples, remaining_after

SHARDS = [5, 7, 6, 4]  # samples per shard


def shard_of(sample: int) -> int:
    return int(np.searchsorted(np.cumsum(SHARDS), sample, side="right"))


def test_an_epoch_reads_every_sample_once_a_shard_at_a_time():
    order = epoch_order(SHARDS, seed=0, epoch=3, shuffle=True)
    assert sorted(order.tolist()) == list(range(sum(SHARDS)))
    runs = [shard_of(s) for s in order]
    assert sum(a != b for a, b in itertools.pairwise(runs)) == len(SHARDS) - 1  # each shard in one piece
    assert epoch_order(SHARDS, 0, 3, shuffle=False).tolist() == list(range(sum(SHARDS)))


def test_samples_inside_a_shard_come_in_a_new_order_every_epoch():
    """Not only the shard order: a shard read in the same order every epoch would give the same neighbours in
    every batch."""
    def within(epoch: int) -> dict[int, list[int]]:
        order = epoch_order(SHARDS, seed=0, epoch=epoch, shuffle=True)
        return {shard: [s for s in order if shard_of(s) == shard] for shard in range(len(SHARDS))}

    epochs = [within(e) for e in range(4)]
    for shard in range(len(SHARDS)):
        orders = {tuple(e[shard]) for e in epochs}
        assert len(orders) >= 3, f"shard {shard} read in {len(orders)} orders over 4 epochs"
    assert epoch_order(SHARDS, 0, 1, True).tolist() == epoch_order(SHARDS, 0, 1, True).tolist()  # reproducible
    assert epoch_order(SHARDS, 0, 1, True).tolist() != epoch_order(SHARDS, 1, 1, True).tolist()  # seeded


def test_ranks_take_disjoint_blocks_of_equal_batch_counts():
    order = epoch_order(SHARDS, 0, 0, True)
    blocks = [rank_samples(order, r, 3, 2, train=True) for r in range(3)]
    assert [len(b) for b in blocks] == [6, 6, 6]  # 22 samples / 3 ranks = 7 each: 3 full batches of 2
    assert not set(blocks[0].tolist()) & set(blocks[1].tolist())
    evaluation = [rank_samples(order, r, 3, 2, train=False) for r in range(3)]
    assert sorted(np.concatenate(evaluation).tolist()) == sorted(order.tolist())


def test_remaining_after_drops_exactly_what_each_rank_read():
    order = np.arange(20)
    rest = remaining_after(order, Segment(world_size=2, local_batch_size=3, batches=2))
    assert rest.tolist() == [6, 7, 8, 9, 16, 17, 18, 19]  # rank 0 read 0-5, rank 1 read 10-15


def test_read_position_transitions():
    start = ReadPosition(epoch=2)
    assert start.after_batch().after_batch() == ReadPosition(2, 2)
    assert ReadPosition(2, 2).at_epoch(2) == ReadPosition(2, 2)  # a restored place is kept by set_epoch
    assert ReadPosition(2, 2).at_epoch(3) == ReadPosition(3)
    handed = ReadPosition(2, 3).handed_to_new_ranks(world_size=4, local_batch_size=8)
    assert handed == ReadPosition(2, 0, (Segment(4, 8, 3),))
    assert handed.after_batch().rewound() == handed
    assert ReadPosition(2, 0).handed_to_new_ranks(4, 8) == ReadPosition(2, 0)  # nothing read: nothing handed over


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    """41 samples, each its own class, in several shards: a label names a sample."""
    from tests.test_loader import shards_from, write_jpeg

    root = tmp_path_factory.mktemp("plan_ids")
    rng = np.random.default_rng(0)
    for i in range(41):
        write_jpeg(root / "tree" / f"c{i:03d}" / "img.JPEG", rng.integers(0, 255, (24, 24, 3)))
    return shards_from(root / "tree", root / "shards")


def loaders(shards, world: int, local_batch_size: int) -> list:
    return [build_loader(shards, local_batch_size=local_batch_size, img_size=8, rank=r, world_size=world,
                         device="cpu", backend="pil", num_threads=0) for r in range(world)]


def read(loader, epoch: int, batches: int | None = None) -> list[int]:
    """Labels of the next `batches` batches of `epoch` (all of them by default)."""
    loader.set_epoch(epoch)
    stream = iter(loader)
    count = len(loader) - loader.position.batch if batches is None else batches
    return [label for _ in range(count) for label in next(stream)[1].tolist()]


def test_a_resume_with_another_local_batch_size_reads_the_rest_of_the_epoch_once(id_shards):
    before = []
    for loader in loaders(id_shards, 2, 4):
        before += read(loader, 5, 2)
    state = loaders(id_shards, 2, 4)[0]
    state.set_epoch(5)
    stream = iter(state)
    next(stream), next(stream)
    after = []
    for loader in loaders(id_shards, 2, 3):  # the same two ranks, a smaller local batch
        loader.load_state_dict(state.state_dict())
        after += read(loader, 5)
    assert len(before) == len(set(before)) == 16 and len(after) == len(set(after))
    assert not set(before) & set(after)
    assert 41 - len(before) - len(after) < 2 * (3 + 1)


def test_an_epoch_handed_over_twice_reads_every_sample_at_most_once(id_shards):
    """2 ranks read 1 batch each, 3 ranks 1 more each, then 1 rank finishes the epoch."""
    seen = []
    first = loaders(id_shards, 2, 4)
    for loader in first:
        seen += read(loader, 7, 1)
    state = first[0].state_dict()
    second = loaders(id_shards, 3, 2)
    for loader in second:
        loader.load_state_dict(state)
        seen += read(loader, 7, 1)
    state = second[0].state_dict()
    (last,) = loaders(id_shards, 1, 5)
    last.load_state_dict(state)
    seen += read(last, 7)
    assert len(seen) == len(set(seen)), sorted(seen)
    assert 41 - len(seen) < 5 + 2 * 3  # what no rank count could fill a batch with


def test_an_epoch_handed_over_to_a_rank_count_that_divides_nothing_reads_every_sample_once():
    """41 samples; 3 ranks read 2 batches of 4 each, then the rest (17, a prime) goes to 5 ranks, whose blocks
    (evaluation mode: every sample, the last batch partial) are 3 or 4 long."""
    order = epoch_order([*SHARDS, 19], seed=1, epoch=2, shuffle=True)
    before = [s for rank in range(3) for s in rank_samples(order, rank, 3, 4, train=True)[:8]]
    rest = remaining_after(order, Segment(world_size=3, local_batch_size=4, batches=2))
    after = [s for rank in range(5) for s in rank_samples(rest, rank, 5, 2, train=False)]
    assert len(rest) == 17 and sorted(before + after) == list(range(41))  # every sample, once
