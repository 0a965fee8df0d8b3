"""The epoch plan: which samples each rank reads, in what order, and how an epoch changes hands.
Pure numpy rules first, then the same rules through a real loader's state (PIL backend: no decoding
needed to count)."""

import itertools
import tracemalloc

import numpy as np
import pytest

from pipeline import build_loader
from pipeline import epoch_plan as plan_module
from pipeline.epoch_plan import EpochPlan, order_in_shard, whole_epoch_order
from pipeline.loader_state import ReadPosition, Segment

SHARDS = [5, 7, 6, 4]  # samples per shard


def shard_of(sample: int) -> int:
    return int(np.searchsorted(np.cumsum(SHARDS), sample, side="right"))


def whole_epoch(sizes: list[int], seed: int, epoch: int) -> np.ndarray:
    return whole_epoch_order(np.asarray(sizes), seed, epoch)


def rank_share(order: np.ndarray, rank: int, world: int, local_batch_size: int, train: bool,
               segments: tuple[Segment, ...] = ()) -> np.ndarray:
    """The specification of a rank's share: drop what each hand-over segment read (each of its ranks
    the start of its block), take the rank-th contiguous block of the rest, in training cut to every
    rank's full batches."""
    for segment in segments:
        n, read = len(order), np.zeros(len(order), dtype=bool)
        for r in range(segment.world_size):
            start = n * r // segment.world_size
            read[start:start + segment.batches * segment.local_batch_size] = True
        order = order[~read]
    n = len(order)
    mine = order[n * rank // world:n * (rank + 1) // world]
    return mine[:(n // world) // local_batch_size * local_batch_size] if train else mine


def plan(
    sizes: list[int], seed: int = 0, train: bool = True, limit: int | None = None
) -> EpochPlan:
    return EpochPlan(np.asarray(sizes, dtype=np.int64), seed, train, limit)


def test_an_epoch_reads_every_sample_once_a_shard_at_a_time():
    order = whole_epoch(SHARDS, seed=0, epoch=3)
    assert sorted(order.tolist()) == list(range(sum(SHARDS)))
    runs = [shard_of(s) for s in order]
    # each shard in one piece
    assert sum(a != b for a, b in itertools.pairwise(runs)) == len(SHARDS) - 1
    stored = plan(SHARDS, train=False).rank_samples(ReadPosition(3), 0, 1, 4)
    assert stored.tolist() == list(range(sum(SHARDS)))


def test_samples_inside_a_shard_come_in_a_new_order_every_epoch():
    """Not only the shard order: a shard read in the same order every epoch would give the same
    neighbours in every batch."""
    def within(epoch: int) -> dict[int, list[int]]:
        order = whole_epoch(SHARDS, seed=0, epoch=epoch)
        return {shard: [s for s in order if shard_of(s) == shard] for shard in range(len(SHARDS))}

    epochs = [within(e) for e in range(4)]
    for shard in range(len(SHARDS)):
        orders = {tuple(e[shard]) for e in epochs}
        assert len(orders) >= 3, f"shard {shard} read in {len(orders)} orders over 4 epochs"
    assert whole_epoch(SHARDS, 0, 1).tolist() == whole_epoch(SHARDS, 0, 1).tolist()  # reproducible
    assert whole_epoch(SHARDS, 0, 1).tolist() != whole_epoch(SHARDS, 1, 1).tolist()  # seeded


def test_ranks_take_disjoint_blocks_of_equal_batch_counts():
    blocks = [plan(SHARDS).rank_samples(ReadPosition(0), r, 3, 2) for r in range(3)]
    # 22 samples / 3 ranks = 7 each: 3 full batches of 2
    assert [len(b) for b in blocks] == [6, 6, 6]
    assert not set(blocks[0].tolist()) & set(blocks[1].tolist())
    evaluation = [
        plan(SHARDS, train=False).rank_samples(ReadPosition(0), r, 3, 2) for r in range(3)
    ]
    assert sorted(np.concatenate(evaluation).tolist()) == list(range(sum(SHARDS)))


def test_a_hand_over_drops_exactly_what_each_rank_read():
    rest = plan([20], train=False).rank_samples(ReadPosition(0, 0, (Segment(2, 3, 2),)), 0, 1, 1)
    assert rest.tolist() == [6, 7, 8, 9, 16, 17, 18, 19]  # rank 0 read 0-5, rank 1 read 10-15


@pytest.mark.parametrize("case", range(60))
def test_each_rank_computes_exactly_its_share_of_the_whole_epoch_after_any_hand_overs(case):
    """The rank's own computation (runs of places, the shards they fall in) against the
    specification, which orders the whole epoch: random shard sizes, rank counts, batch sizes,
    limits and chains of hand-overs."""
    rng = np.random.default_rng(case)
    sizes = rng.integers(0 if case % 3 else 1, 40, rng.integers(1, 12)).tolist()
    total = sum(sizes)
    train = bool(case % 4)
    limit = int(rng.integers(1, total + 2)) if case % 5 == 0 and total else None
    samples = total if limit is None else min(limit, total)
    order = whole_epoch(sizes, 7, case) if train else np.arange(total)
    order = order[:samples]
    segments: list[Segment] = []
    for _ in range(rng.integers(0, 4)):  # each segment reads part of what the ones before it left
        world, local_batch = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        left = len(rank_share(order, 0, 1, 1, False, tuple(segments)))
        most = (left // world) // local_batch
        if most:
            segments.append(Segment(world, local_batch, int(rng.integers(1, most + 1))))
    world, local_batch = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    position = ReadPosition(case, 0, tuple(segments))
    for rank in range(world):
        got = plan(sizes, 7, train, limit).rank_samples(position, rank, world, local_batch)
        want = rank_share(order, rank, world, local_batch, train, tuple(segments))
        assert got.tolist() == want.tolist(), (sizes, segments, world, local_batch, rank)


def test_a_rank_orders_only_the_shards_it_reads_in_memory_that_follows_its_share(monkeypatch):
    """100 M samples in 20,000 shards over 512 ranks: rank 5's share is 195,312 samples in about 40
    shards. Its plan draws the order of exactly the shards its block touches, and its peak
    allocation is a few times its share, where the whole epoch's order alone is 800 MB."""
    sizes = np.full(20_000, 5_000, dtype=np.int64)
    ordered: list[int] = []

    def counted(size: int, seed: int, epoch: int, shard: int) -> np.ndarray:
        ordered.append(shard)
        return order_in_shard(size, seed, epoch, shard)

    monkeypatch.setattr(plan_module, "order_in_shard", counted)
    tracemalloc.start()
    mine = EpochPlan(sizes, 0, True).rank_samples(
        ReadPosition(2, 0, (Segment(256, 1024, 3),)), 5, 512, 256
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(mine) == (sizes.sum() - 256 * 3 * 1024) // 512 // 256 * 256
    touched = set((np.searchsorted(np.cumsum(sizes), mine, side="right")).tolist())
    assert sorted(ordered) == sorted(touched) and len(touched) < 45
    share_mib = mine.nbytes / 2**20
    assert peak < 12 * mine.nbytes + 8 * sizes.nbytes, (
        f"{peak / 2**20:.0f} MiB for a share of {share_mib:.1f} MiB"
    )


def test_read_position_transitions():
    start = ReadPosition(epoch=2)
    assert start.after_batch().after_batch() == ReadPosition(2, 2)
    # a restored place is kept by set_epoch
    assert ReadPosition(2, 2).at_epoch(2) == ReadPosition(2, 2)
    assert ReadPosition(2, 2).at_epoch(3) == ReadPosition(3)
    handed = ReadPosition(2, 3).handed_to_new_ranks(world_size=4, local_batch_size=8)
    assert handed == ReadPosition(2, 0, (Segment(4, 8, 3),))
    assert handed.after_batch().rewound() == handed
    # nothing read: nothing handed over
    assert ReadPosition(2, 0).handed_to_new_ranks(4, 8) == ReadPosition(2, 0)


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
    return [
        build_loader(
            shards,
            local_batch_size=local_batch_size,
            img_size=8,
            rank=r,
            world_size=world,
            device="cpu",
            backend="pil",
            num_threads=0,
        )
        for r in range(world)
    ]


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
    """41 samples; 3 ranks read 2 batches of 4 each, then the rest (17, a prime) goes to 5 ranks,
    whose blocks (evaluation mode: every sample, the last batch partial) are 3 or 4 long."""
    sizes = [*SHARDS, 19]
    before = [
        s for rank in range(3) for s in plan(sizes, 1).rank_samples(ReadPosition(2), rank, 3, 4)[:8]
    ]
    handed = ReadPosition(2, 0, (Segment(world_size=3, local_batch_size=4, batches=2),))
    # The rest in training's order, read as evaluation reads: every sample of each block.
    rest = rank_share(whole_epoch(sizes, 1, 2), 0, 1, 1, False, handed.handed_over)
    after = [s for rank in range(5) for s in rank_share(rest, rank, 5, 2, False)]
    assert len(rest) == 17 and sorted(before + after) == list(range(41))  # every sample, once
    assert plan(sizes, 1).rank_samples(handed, 0, 1, 1).tolist() == rest.tolist()
