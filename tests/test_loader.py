"""Both loader backends over real shards from the builder, with real DALI CPU pipelines."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import IMAGENET_MEAN, IMAGENET_STD, build_loader
from pipeline.build_shards import main as build_shards
from pipeline.dali_graph import ascii_labels
from pipeline.errors import DamagedIndex

BACKENDS = ["dali", "pil"]


def write_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path, "JPEG", quality=95)


def shards_from(tree: Path, out: Path, *extra: str) -> Path:
    assert (
        build_shards(
            [str(tree), str(out), "--shard-size-mb", "0.02", "--workers", "1", "--quiet", *extra]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    """41 small photos, each its own class, so a label identifies a sample."""
    root = tmp_path_factory.mktemp("ids")
    rng = np.random.default_rng(0)
    for i in range(41):
        write_jpeg(
            root / "tree" / f"c{i:03d}" / "img.JPEG", rng.integers(0, 255, (40 + i % 7, 48, 3))
        )
    return shards_from(root / "tree", root / "shards")


@pytest.fixture(scope="module")
def gradient_shards(tmp_path_factory):
    """Images whose red channel is 2*x and green 2*y, so a crop reveals its window."""
    root = tmp_path_factory.mktemp("grad")
    ys, xs = np.mgrid[0:128, 0:128]
    pixels = np.stack([xs * 2, ys * 2, np.full_like(xs, 128)], axis=-1)
    for i in range(8):
        write_jpeg(root / "tree" / "c0" / f"{i}.JPEG", pixels)
    return shards_from(root / "tree", root / "shards")


@pytest.fixture(scope="module")
def uniform_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("uniform")
    for i in range(4):
        write_jpeg(root / "tree" / "c0" / f"{i}.JPEG", np.full((48, 64, 3), (200, 100, 50)))
    return shards_from(root / "tree", root / "shards")


@pytest.fixture
def open_loader():
    """build_loader on the CPU with one thread, checking the backend asked for is the one that runs.
    Each loader is closed when its test ends, as the trainer closes its own: DALI pipelines left to
    the garbage collector are torn down at a moment nobody chose, from whichever thread it runs in,
    while other pipelines decode."""
    opened = []

    def open_(shards, backend: str, **options):
        loader = build_loader(shards, backend=backend, device="cpu", num_threads=1, **options)
        opened.append(loader)
        assert loader.backend == backend, f"asked for the {backend} backend, got {loader.backend}"
        return loader

    yield open_
    for loader in opened:
        loader.close()


def epoch_labels(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [label for _, labels in loader for label in labels.tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
def test_shapes_dtype_and_normalization(uniform_shards, backend, train, open_loader):
    loader = open_loader(uniform_shards, backend, local_batch_size=2, img_size=32, train=train)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    images, labels = batches[0]
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0]
    expected = torch.tensor(
        [
            (c / 255 - m) / s
            for c, m, s in zip((200, 100, 50), IMAGENET_MEAN, IMAGENET_STD, strict=True)
        ]
    )
    torch.testing.assert_close(images.mean((0, 2, 3)), expected, atol=0.05, rtol=0)
    assert (images - expected.view(1, 3, 1, 1)).abs().max() < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_output(uniform_shards, backend, open_loader):
    loader = open_loader(
        uniform_shards, backend, local_batch_size=2, img_size=32, dtype=torch.bfloat16
    )
    assert next(iter(loader))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_crops_respect_scale_and_ratio_and_flip_half_the_time(
    gradient_shards, backend, open_loader
):
    loader = open_loader(gradient_shards, backend, local_batch_size=8, img_size=32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    areas, ratios, flips = [], [], 0
    for epoch in range(12):
        loader.set_epoch(epoch)
        for images, _ in loader:
            # back to source coordinates: red = x, green = y
            pixels = (images * std + mean) * 255 / 2
            red, green = pixels[:, 0], pixels[:, 1]
            x_first, x_last = red[:, :, 0].mean(1), red[:, :, -1].mean(1)
            y_top, y_bottom = green[:, 0, :].mean(1), green[:, -1, :].mean(1)
            flips += int((x_first > x_last).sum())
            # Output pixel centres span (S-1)/S of the window; undo that to get the window size.
            width = (x_last - x_first).abs() * 32 / 31
            height = (y_bottom - y_top) * 32 / 31
            areas += (width * height / 128**2).tolist()
            ratios += (width / height).tolist()
    assert len(areas) == 96
    assert min(areas) > 0.2 * 0.85 and max(areas) < 1.0 * 1.1
    assert min(ratios) > 0.75 * 0.9 and max(ratios) < 4 / 3 * 1.1
    assert max(areas) - min(areas) > 0.4  # the scale range is actually explored
    assert 30 <= flips <= 66  # p = 0.5 over 96 crops: about 48, outside this is < 1e-4 likely


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_see_disjoint_samples_and_nearly_all(id_shards, backend, open_loader):
    batch, world = 4, 2
    loaders = [
        open_loader(
            id_shards, backend, local_batch_size=batch, img_size=16, rank=r, world_size=world
        )
        for r in range(world)
    ]
    assert len(loaders[0]) == len(loaders[1]) == (41 // 2) // 4
    for epoch in range(2):
        seen = [epoch_labels(loader, epoch) for loader in loaders]
        assert all(len(s) == len(set(s)) == len(loaders[0]) * batch for s in seen)
        assert not set(seen[0]) & set(seen[1])
        assert 41 - len(set(seen[0]) | set(seen[1])) < world * batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_reads_different_samples_in_different_epochs(id_shards, backend, open_loader):
    """Each rank must move through the data set over epochs, not train on one fixed share of it."""
    loader = open_loader(id_shards, backend, local_batch_size=4, img_size=16, rank=0, world_size=2)
    first, second = set(epoch_labels(loader, 0)), set(epoch_labels(loader, 1))
    assert len(first) == len(second) == len(loader) * 4
    assert len(first & second) <= 0.75 * len(first), (first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_crop_is_centred(gradient_shards, backend, open_loader):
    """Evaluation resizes the shorter side to S/0.875 and takes the central S x S: on a gradient
    image (red = 2x, green = 2y over 128 px) the crop's mean colour is the image centre's, 128."""
    loader = open_loader(gradient_shards, backend, local_batch_size=8, img_size=32, train=False)
    images, _ = next(iter(loader))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    red, green = ((images * std + mean) * 255)[:, :2].mean((0, 2, 3)).tolist()
    assert abs(red - 128) < 4 and abs(green - 128) < 4, (red, green)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_eval_yields_every_sample_exactly_once(id_shards, backend, world, open_loader):
    labels = []
    for rank in range(world):
        loader = open_loader(
            id_shards,
            backend,
            local_batch_size=4,
            img_size=16,
            train=False,
            rank=rank,
            world_size=world,
        )
        labels += epoch_labels(loader, 0)
    assert sorted(labels) == list(range(41))


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_differ_and_a_seed_reproduces_the_stream(id_shards, backend, open_loader):
    def stream(seed):
        loader = open_loader(id_shards, backend, local_batch_size=4, img_size=16, seed=seed)
        return [epoch_labels(loader, e) for e in range(2)]
    first = stream(0)
    assert first == stream(0)
    assert first[0] != first[1]
    assert first != stream(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loop_ended", [False, True])
def test_resume_mid_epoch_continues_with_the_same_batches(
    id_shards, backend, loop_ended, open_loader
):
    """Bitwise: the state taken mid-epoch (while the loop runs, as a periodic checkpoint does, or
    after it stopped, as at the end of a run) reproduces the rest of the stream, crops included."""
    def make():
        return open_loader(
            id_shards, backend, local_batch_size=4, img_size=16, rank=1, world_size=2
        )

    whole = make()
    whole.set_epoch(2)
    list(whole)  # so that epoch 3, as in a training run, is the one built ahead in the background
    whole.set_epoch(3)
    expected = list(whole)
    whole.set_epoch(4)
    expected_next_epoch = list(whole)

    first = make()
    first.set_epoch(3)
    batches = iter(first)
    head = [next(batches) for _ in range(2)]
    if loop_ended:
        batches.close()
    state = first.state_dict()
    del batches, first

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the training loop calls this again on resume: must not rewind
    tail = list(resumed)
    resumed.set_epoch(4)
    for got, want in zip(head + tail + list(resumed), expected + expected_next_epoch, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_resume_at_any_batch_mid_window_or_at_a_windows_edge_continues_bitwise(
    id_shards, open_loader
):
    """DALI reads an epoch in windows (here of 2 batches: 3 shards of about 3 samples): a state
    taken after any number of batches, inside a window or at its edge, gives the rest of the epoch
    and the next one exactly as the unbroken loader does."""
    def make():
        return open_loader(id_shards, "dali", local_batch_size=4, img_size=16, rank=1,
                           world_size=2, window_shards=3)

    whole = make()
    assert whole.window_batches == 2 and len(whole) == 5
    expected = []
    for epoch in (0, 1):
        whole.set_epoch(epoch)
        expected += list(whole)
    for stop in range(6):
        first = make()
        first.set_epoch(0)
        batches = iter(first)
        head = [next(batches) for _ in range(stop)]
        state = first.state_dict()
        resumed = make()
        resumed.load_state_dict(state)
        resumed.set_epoch(0)
        got = head + list(resumed)
        resumed.set_epoch(1)
        got += list(resumed)
        assert len(got) == len(expected) == 10
        for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels), stop
        batches.close()
        first.close()
        resumed.close()


def test_ascii_labels():
    rows = [b"7\0\0\0", b"1000", b"42\0\0", b"-1\0\0", b"-123"]
    padded = torch.tensor([list(row) for row in rows], dtype=torch.uint8)
    assert ascii_labels(padded).tolist() == [7, 1000, 42, -1, -123]  # -1: an unlabeled sample


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_errors(id_shards, tmp_path, backend):
    opts = dict(img_size=16, backend=backend, device="cpu", num_threads=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(tmp_path / "missing", local_batch_size=4, **opts)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train.json not found"):
        build_loader(tmp_path / "empty", local_batch_size=4, **opts)
    with pytest.raises(
        ValueError, match=r"batch size 32 is larger than a rank's share of 20 samples \(41"
    ):
        build_loader(id_shards, local_batch_size=32, rank=1, world_size=2, **opts)
    with pytest.raises(FileNotFoundError, match=r"\d+ file\(s\) missing, first .*train-000099.tar"):
        build_loader(str(id_shards / "train-{000099..000000}.tar"), local_batch_size=4, **opts)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in id_shards.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "train-000000.tar").rename(copy / "train-000777.tar")
    (copy / "train-000000.idx").rename(copy / "train-000777.idx")
    with pytest.raises(
        ValueError, match=r"train-000777.tar is not in .*train.json: the shard list and manifest"
    ):
        build_loader(str(copy / "train-{000777,000001}.tar"), local_batch_size=4, **opts)
    with pytest.raises(FileNotFoundError, match=r"lists 1 shard\(s\) that are missing"):
        build_loader(copy, local_batch_size=4, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_index_that_disagrees_with_its_manifest_stops_the_reading_naming_it(
    id_shards, tmp_path, backend, open_loader
):
    """A loader reads a shard's index when it first reads the shard (a rank reads its own share's,
    not all of them): an index cut short, or whose header disagrees with the manifest, stops that
    reading, naming the file."""
    for damage, message in (
        (
            lambda lines: lines[:-1],
            r"train-000000.idx: the header says \d+ samples, the file "
            r"lists \d+",
        ),
        (
            lambda lines: ["v1.2 999", *lines[1:]],
            r"train-000000.idx: the index header lists 999 "
            r"samples, the manifest \d+",
        ),
    ):
        bad = tmp_path / f"bad{len(message)}"
        bad.mkdir()
        for p in id_shards.iterdir():
            (bad / p.name).write_bytes(p.read_bytes())
        idx = bad / "train-000000.idx"
        idx.write_text("\n".join(damage(idx.read_text().splitlines())) + "\n")
        loader = open_loader(bad, backend, local_batch_size=4, img_size=16, train=False)
        # a RuntimeError: a run stops with exit 5, resumable
        with pytest.raises(DamagedIndex, match=message):
            list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_image_in_a_shard_fails_naming_it(tmp_path, backend, open_loader):
    rng = np.random.default_rng(1)
    for i in range(6):
        write_jpeg(tmp_path / "tree" / "c0" / f"{i}.JPEG", rng.integers(0, 255, (32, 32, 3)))
    out = shards_from(tmp_path / "tree", tmp_path / "shards", "--shard-size-mb", "100")
    tar = out / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    first_jpg = int((out / "train-000000.idx").read_text().splitlines()[1].split()[1])
    data[first_jpg:first_jpg + 4] = b"GIF8"  # no longer a JPEG: no decoder accepts it
    tar.write_bytes(bytes(data))
    loader = open_loader(out, backend, local_batch_size=2, img_size=16)
    with pytest.raises(RuntimeError, match="build_shards --verify") as err:
        list(loader)
    assert "train-000000" in str(err.value)


@pytest.mark.parametrize("train", [True, False])
def test_both_backends_read_the_same_samples_in_the_same_order(id_shards, train, open_loader):
    streams = []
    for backend in BACKENDS:
        loader = open_loader(
            id_shards, backend, local_batch_size=4, img_size=16, rank=1, world_size=2, train=train
        )
        streams.append([epoch_labels(loader, epoch) for epoch in range(2)])
    assert streams[0] == streams[1]


def read_batches(loader, count: int) -> list[int]:
    """Labels of the next `count` batches of the loader's current epoch."""
    batches = iter(loader)
    return [label for _ in range(count) for label in next(batches)[1].tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("new_world", [1, 3])
def test_an_epoch_interrupted_on_two_ranks_finishes_on_another_count(
    id_shards, backend, new_world, open_loader
):
    """The rest of an interrupted epoch is read exactly once by the new ranks, in equal batch
    counts; the epochs after it are whole epochs at the new rank count."""
    old = [
        open_loader(id_shards, backend, local_batch_size=4, img_size=16, rank=r, world_size=2)
        for r in range(2)
    ]
    before = []
    for loader in old:
        loader.set_epoch(5)
        before += read_batches(loader, 2)
    state = old[0].state_dict()
    new = [
        open_loader(
            id_shards, backend, local_batch_size=3, img_size=16, rank=r, world_size=new_world
        )
        for r in range(new_world)
    ]
    after = []
    for loader in new:
        loader.load_state_dict(state)
        loader.set_epoch(5)  # the trainer calls this on resume: it must not restart the epoch
        assert len(loader) == len(new[0]) > 0
        after += epoch_labels(loader, 5)
    assert len(before) == len(set(before)) == 16 and len(after) == len(set(after))
    assert not set(before) & set(after)
    # only what cannot fill a batch on every rank
    assert 41 - len(before) - len(after) < new_world * (3 + 1)
    following = [label for loader in new for label in epoch_labels(loader, 6)]
    assert len(following) == len(set(following)) == new_world * (41 // new_world // 3) * 3


def test_threads_default_to_the_usable_cores_over_the_ranks_on_the_node(monkeypatch):
    from pipeline.loader import LOCAL_RANK_COUNT_VARIABLES, default_threads

    usable = len(os.sched_getaffinity(0))
    for name in (*LOCAL_RANK_COUNT_VARIABLES, "SLURM_CPUS_PER_TASK", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert default_threads() == usable
    monkeypatch.setenv("LOCAL_SIZE", "2")  # what the deepspeed launcher sets
    assert default_threads() == max(1, usable // 2)
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", str(4 * usable))
    assert default_threads() == 1
    # srun binding each task to its --cpus-per-task: the task's CPUs are its own, not divided again.
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert default_threads() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(usable))
    assert default_threads() == usable
    # One task per node starting a launcher of two ranks: the task's CPUs are shared by both.
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == max(1, usable // 2)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "1(x2)")  # what SLURM sets without --ntasks-per-node
    assert default_threads() == max(1, usable // 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_taken_after_an_exact_resume_resumes_exactly_too(
    id_shards, backend, open_loader
):
    """A run checkpointed, resumed, checkpointed again and resumed again reads the batches an
    uninterrupted one reads: the exact (DALI) state must survive the first resume."""
    def make():
        return open_loader(
            id_shards, backend, local_batch_size=2, img_size=16, rank=0, world_size=2
        )

    whole = make()
    whole.set_epoch(1)
    expected = list(whole)
    assert len(expected) == 10

    first = make()
    first.set_epoch(1)
    head = read_tensors(first, 3)
    second = make()
    second.load_state_dict(first.state_dict())
    second.set_epoch(1)
    middle = read_tensors(second, 3)
    third = make()
    third.load_state_dict(second.state_dict())
    third.set_epoch(1)
    tail = list(third)
    for got, want in zip(head + middle + tail, expected, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def read_tensors(loader, count: int) -> list:
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def test_evaluation_pixels_agree_between_backends_and_are_never_flipped(
    gradient_shards, open_loader
):
    """The same eval images through DALI and PIL: the same centre crop, bicubic-resized, within a
    few grey levels; and a left-to-right gradient stays left-to-right (evaluation never mirrors)."""
    streams = {backend: [] for backend in BACKENDS}
    for backend, stream in streams.items():
        loader = open_loader(gradient_shards, backend, local_batch_size=8, img_size=32, train=False)
        for epoch in range(2):
            loader.set_epoch(epoch)
            stream += [images for images, _ in loader]
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for dali, pil in zip(streams["dali"], streams["pil"], strict=True):
        grey_levels = ((dali - pil) * std * 255).abs()
        assert grey_levels.mean() < 2.0 and grey_levels.max() < 12, (
            grey_levels.mean(),
            grey_levels.max(),
        )
        for images in (dali, pil):
            red = images[:, 0]  # red = 2x in the source: rises left to right unless mirrored
            assert bool((red[:, :, -1].mean(1) > red[:, :, 0].mean(1)).all())


def test_synthetic_data_follows_the_epoch_plan_and_resumes_exactly():
    """Random images made in place, in the real loaders' range, at the real batch counts and
    positions."""
    def make(rank=0, world=2):
        return build_loader(
            None,
            backend="synthetic",
            local_batch_size=4,
            img_size=16,
            rank=rank,
            world_size=world,
            device="cpu",
            synthetic_samples=41,
        )

    loader = make()
    assert loader.backend == "synthetic" and len(loader) == 5  # 20 samples a rank: 5 batches of 4
    batches = list(loader)
    images, labels = batches[0]
    assert (
        images.shape == (4, 3, 16, 16)
        and images.dtype == torch.float32
        and labels.dtype == torch.int64
    )
    low = torch.tensor(
        [(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    ).view(1, 3, 1, 1)
    high = torch.tensor(
        [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    ).view(1, 3, 1, 1)
    # spread over the whole range
    assert bool(((images >= low) & (images <= high)).all()) and images.std() > 0.5
    other_rank = [label for _, labels in make(rank=1) for label in labels.tolist()]
    assert not set(other_rank) & {label for _, labels in batches for label in labels.tolist()}
    first = make()
    stream = iter(first)
    head = [next(stream) for _ in range(2)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for got, want in zip(head + list(resumed), batches, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


ODD_SIZES = [(640, 427), (427, 640), (503, 375), (375, 503), (500, 500), (257, 300)]


def torchvision_eval_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The reference's evaluation transform, written out as torchvision computes it: Resize(int(size
    / crop_pct)) with crop_pct 224/256 up to 224 and 1.0 above, then CenterCrop(size). (resized w,
    resized h, left, top)."""
    shorter = int(size / (224 / 256 if size <= 224 else 1.0))
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shorter, int(shorter * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    # torchvision: int(round(..))
    return new_w, new_h, round((new_w - size) / 2.0), round((new_h - size) / 2.0)


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """Low-frequency random colours: a one-pixel shift of a crop changes it measurably, JPEG keeps
    it well."""
    coarse = np.random.default_rng(seed).integers(
        0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8
    )
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


@pytest.mark.parametrize("size", [224, 448, 64])
def test_eval_geometry_is_the_references_resize_and_centre_crop(size):
    from pipeline.loader_base import eval_geometry

    for width, height in ODD_SIZES:
        assert eval_geometry(width, height, size) == torchvision_eval_box(width, height, size), (
            width,
            height,
        )


def test_both_backends_crop_odd_sizes_where_the_reference_does(tmp_path, open_loader):
    """640x427 and 503x375 (each way round) at 224: PIL's pixels equal the reference transform's;
    DALI's come within a grey level of them, and a crop one pixel off would not."""
    (tmp_path / "tree" / "c0").mkdir(parents=True)
    for seed, (width, height) in enumerate(ODD_SIZES[:4]):
        smooth_image(width, height, seed).save(
            tmp_path / "tree" / "c0" / f"{seed}.JPEG", quality=98
        )
    shards = shards_from(tmp_path / "tree", tmp_path / "shards")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for backend in BACKENDS:
        loader = open_loader(shards, backend, local_batch_size=4, img_size=224, train=False)
        batch, _ = next(iter(loader))
        pixels = ((batch * std + mean) * 255).permute(0, 2, 3, 1).double().numpy()
        entries = loader.table.entries(loader.samples())
        for i, got in enumerate(pixels):
            img = Image.open(io.BytesIO(entries.jpeg(i))).convert("RGB")
            new_w, new_h, left, top = torchvision_eval_box(img.width, img.height, 224)
            resized = np.asarray(img.resize((new_w, new_h), Image.BICUBIC), dtype=np.float64)
            error = {
                (dy, dx): np.abs(
                    got - resized[top + dy : top + dy + 224, left + dx : left + dx + 224]
                ).mean()
                for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
                if min(top + dy, left + dx) >= 0
            }
            assert error[(0, 0)] < (0.5 if backend == "pil" else 1.5), (backend, img.size, error)
            assert all(e > error[(0, 0)] + 0.3 for shift, e in error.items() if shift != (0, 0)), \
                (backend, img.size, error)


def test_the_keys_named_here_stay_this_epochs_while_the_next_epoch_is_planned_in_another_thread(
    id_shards, open_loader
):
    """The DALI loader plans the next epoch in a background thread while the loop names the keys of
    the batches it read (log.sample_ids, the search for a damaged image): those must never be the
    other epoch's. The planner runs between any two lines of the loader's `samples` here (each line
    waits a little), as threads may interleave."""
    import sys
    import threading
    import time

    from pipeline.loader_base import Loader
    from pipeline.loader_state import ReadPosition

    loader = open_loader(id_shards, "dali", local_batch_size=4, img_size=16, rank=0, world_size=2)
    loader.set_epoch(0)
    batches = len(loader)
    expected = [loader.batch_keys(b) for b in range(batches)]
    assert loader.table.keys(loader.samples(ReadPosition(1))) != [
        key for keys in expected for key in keys
    ]
    stop = threading.Event()

    def plan_next_epoch() -> None:
        while not stop.is_set():
            loader.samples(ReadPosition(1))

    def between_lines(frame, event, arg):
        if event == "line":
            time.sleep(0.002)  # the planner's turn
        return between_lines

    def trace(frame, event, arg):
        return between_lines if frame.f_code is Loader.samples.__code__ else None

    planner = threading.Thread(target=plan_next_epoch)
    planner.start()
    sys.settrace(trace)
    try:
        seen = [loader.batch_keys(b) for _ in range(3) for b in range(batches)]
    finally:
        sys.settrace(None)
        stop.set()
        planner.join()
    assert seen == expected * 3


@pytest.mark.parametrize("backend", [*BACKENDS, "synthetic"])
def test_a_loader_asked_for_no_labels_gives_none_and_the_same_images(
    id_shards, backend, open_loader
):
    """MAE pre-training reads no labels: its loader reads, decodes and moves none, and its images
    are the same."""
    options = dict(local_batch_size=4, img_size=16, rank=0, world_size=2, synthetic_samples=41)
    shards = None if backend == "synthetic" else id_shards
    with_labels = [(images, labels) for images, labels in open_loader(shards, backend, **options)]
    without = [
        (images, labels) for images, labels in open_loader(shards, backend, labels=False, **options)
    ]
    assert len(with_labels) == len(without) == 41 // 2 // 4
    assert all(labels is None for _, labels in without)
    assert all(labels.dtype == torch.int64 and labels.shape == (4,) for _, labels in with_labels)
    for (images, _), (same, _) in zip(with_labels, without, strict=True):
        assert torch.equal(images, same)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [*BACKENDS, "synthetic"])
@pytest.mark.parametrize("labels", [False, True])
def test_no_batch_crosses_to_the_gpu_from_pageable_memory(id_shards, backend, labels):
    """A copy from pageable host memory waits for the stream: the host loses its run-ahead at every
    batch. Every host-to-device copy a batch makes must come from pinned memory (DALI's own copies
    happen inside its graph)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    copies: list[tuple[str, bool]] = []

    class HostToDevice(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
                source = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
                target = args[0] if func.overloadpacket is torch.ops.aten.copy_ else out
                if source.device.type == "cpu" and target.device.type == "cuda":
                    copies.append((str(source.dtype), source.is_pinned()))
            return out

    shards = None if backend == "synthetic" else id_shards
    loader = build_loader(
        shards,
        backend=backend,
        device="gpu",
        num_threads=2,
        local_batch_size=4,
        img_size=16,
        labels=labels,
        synthetic_samples=41,
    )
    try:
        with HostToDevice():
            batches = [
                (images.device.type, None if y is None else y.device.type) for images, y in loader
            ]
    finally:
        loader.close()
    assert batches and all(b == ("cuda", "cuda" if labels else None) for b in batches), batches
    assert all(pinned for _, pinned in copies), copies
    if backend == "dali" or (backend == "synthetic" and not labels):
        assert copies == []
