"""The shard builder on real files: real tars, DALI's own wds2idx and webdataset reader."""

import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.build_shards import main as build_main
from pipeline.formats import VERSIONS, FormatError
from pipeline.manifest import Manifest
from tests.image_trees import MAX_PIXELS, write_tree


def build(src: Path, out: Path, *extra: str) -> int:
    return build_main([str(src), str(out), "--shard-size-mb", "0.03", "--workers", "1", "--quiet",
                       "--max-pixels", str(MAX_PIXELS), *extra])


@pytest.fixture()
def tree(tmp_path):
    src = tmp_path / "src"
    return src, write_tree(src)


@pytest.fixture()
def built(tree, tmp_path):
    src, expected = tree
    out = tmp_path / "out"
    assert build(src, out) == 0
    return src, out, expected


def read_all(out: Path) -> dict[str, dict]:
    manifest = Manifest.load(out / "train.json")
    urls = [str(out / s.name) for s in manifest.shards]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["path"] not in samples, f"{meta['path']} appears twice"
        samples[meta["path"]] = dict(
            meta, label=int(sample["cls"]), key=sample["__key__"], jpg=sample["jpg"]
        )
    return samples


def test_every_good_image_once_with_its_label(built):
    _, out, expected = built
    samples = read_all(out)
    assert {path: s["label"] for path, s in samples.items()} == expected
    manifest = Manifest.load(out / "train.json")
    assert manifest.samples == len(expected) and len(manifest.shards) > 1
    assert manifest.classes == ["n01000001", "n01000002", "n01000003"]
    assert sum(s.samples for s in manifest.shards) == manifest.samples
    for s in samples.values():
        assert s["key"].isascii() and "." not in s["key"] and s["jpg"][:2] == b"\xff\xd8"


def test_bad_inputs_are_converted_or_rejected_with_reasons(built):
    _, out, _ = built
    manifest = Manifest.load(out / "train.json")
    reasons = {r["path"]: r["reason"] for r in Manifest.reports(out, "train", "rejected")}
    assert (manifest.rejected, manifest.converted) == (4, 2)
    assert set(reasons) == {
        "n01000001/empty.JPEG",
        "n01000002/truncated.JPEG",
        "n01000003/notes.txt",
        "n01000003/huge.JPEG",
    }
    assert "empty" in reasons["n01000001/empty.JPEG"]
    assert "truncated" in reasons["n01000002/truncated.JPEG"]
    assert "not an image" in reasons["n01000003/notes.txt"]
    assert "pixel limit" in reasons["n01000003/huge.JPEG"]
    samples = read_all(out)
    assert samples["n01000001/cmyk.JPEG"]["converted"] == "JPEG CMYK -> RGB JPEG"
    assert samples["n01000002/really_a_png.JPEG"]["converted"] == "PNG RGBA -> RGB JPEG"
    assert "converted" not in samples["n01000003/c_0.JPEG"]  # grayscale JPEG kept as is
    assert {c["path"] for c in Manifest.reports(out, "train", "converted")} == {
        "n01000001/cmyk.JPEG",
        "n01000002/really_a_png.JPEG",
    }


def test_strict_fails_after_the_summary(tree, tmp_path, capsys):
    src, _ = tree
    assert build(src, tmp_path / "strict", "--strict") == 5  # damaged data found
    captured = capsys.readouterr()
    assert "4 rejected" in captured.out and "truncated.JPEG" in captured.err
    assert (tmp_path / "strict" / "train.json").is_file()


def test_index_files_equal_dali_wds2idx(built, tmp_path):
    _, out, _ = built
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for tar in sorted(out.glob("*.tar")):
        theirs = tmp_path / (tar.stem + ".dali.idx")
        subprocess.run([str(wds2idx), str(tar), str(theirs)], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_bytes() == theirs.read_bytes()


def test_dali_webdataset_reader_reads_every_sample(built):
    from nvidia.dali import fn, pipeline_def

    _, out, expected = built
    tars = sorted(out.glob("*.tar"))

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(
            paths=[str(t) for t in tars],
            index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["jpg", "cls"],
            name="reader",
        )
        return fn.decoders.image(jpg, device="cpu"), cls

    pipe = read()
    pipe.build()
    total = pipe.epoch_size("reader")
    assert total == len(expected)
    seen = 0
    while seen < total:
        images, _ = pipe.run()
        seen += len(images)
        assert all(images.at(i).shape[2] == 3 for i in range(len(images)))


def test_same_inputs_same_bytes_and_plain_ustar(tree, tmp_path):
    src, _ = tree
    assert build(src, tmp_path / "a") == 0 and build(src, tmp_path / "b") == 0
    for tar in sorted((tmp_path / "a").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "b" / tar.name).read_bytes()
        with tarfile.open(tar) as t:
            assert all(m.type == tarfile.REGTYPE and not m.pax_headers for m in t.getmembers())
        assert tar.read_bytes()[257:263] == b"ustar\x00"
    # Parallel workers change nothing but the speed, nor does a shuffle that holds 2 images in
    # memory at a time (its listing split and split again by the hash's bytes).
    assert (
        build_main(
            [
                str(src),
                str(tmp_path / "d"),
                "--shard-size-mb",
                "0.03",
                "--workers",
                "2",
                "--quiet",
                "--max-pixels",
                str(MAX_PIXELS),
                "--sort-buffer",
                "2",
            ]
        )
        == 0
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.tar")} == {
        p.name: p.read_bytes() for p in (tmp_path / "d").glob("*.tar")}
    for name in ("train.json", "train.rejected.jsonl", "train.converted.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "d" / name).read_text()
    assert build(src, tmp_path / "c", "--seed", "1") == 0
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() != (
        tmp_path / "c" / "train-000000.tar"
    ).read_bytes()


def test_interrupted_build_resumes_and_keeps_finished_shards(built, tmp_path, capsys):
    src, out, _ = built
    reference = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    reports = {p.name: p.read_text() for p in out.glob("train.*.jsonl")}
    shards = sorted(out.glob("*.tar"))
    assert len(shards) >= 3
    # a shard with a report, written again after later ones are kept
    with tarfile.open(shards[0]) as tar:
        assert any(
            b'"converted"' in tar.extractfile(m).read() for m in tar if m.name.endswith(".json")
        )
    kept_mtime = shards[1].stat().st_mtime_ns
    # An interruption: manifest never written, one shard gone, one half-written, a stale temp file.
    (out / "train.json").unlink()
    shards[0].unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:1000])
    (out / (shards[0].name + ".tmp")).write_bytes(b"partial")
    with open(out / ".train.progress.jsonl", "a") as log:  # killed while it noted a shard
        log.write('{"index": 0, "rec')
    (out / ".scratch").mkdir()  # and while it split its listing
    (out / ".scratch" / "train.listing").write_text("00ff\t[\"cut")
    (out / ".scratch" / "train.listing.7f").write_text("7f00\t[\"cut")
    capsys.readouterr()
    # the buffer changes no shard: the finished ones are kept
    assert build(src, out, "--sort-buffer", "2") == 0
    assert "shards already complete, 2 to write" in capsys.readouterr().out
    assert shards[1].stat().st_mtime_ns == kept_mtime
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == reference
    assert not list(out.glob("*.tmp")) and not (out / ".scratch").exists()
    # The reports in shard order, whatever order the shards were written in.
    assert {p.name: p.read_text() for p in out.glob("train.*.jsonl")} == reports and len(
        reports
    ) == 2
    assert Manifest.load(out / "train.json").rejected == 4


def test_a_rerun_writes_again_a_finished_shard_whose_index_is_gone(built, tmp_path, capsys):
    """A shard the progress file lists as finished, whole, but without its index (deleted, or lost
    with the disk's cache): not kept as it is, written again with its index."""
    src, out, _ = built
    copy = tmp_path / "rerun"
    shutil.copytree(out, copy)
    reference = {p.name: p.read_bytes() for p in copy.glob("*.tar*")}
    (copy / "train.json").unlink()  # killed before its manifest
    index = sorted(copy.glob("*.idx"))[1]
    index.unlink()
    capsys.readouterr()
    assert build(src, copy) == 0
    assert "shards already complete, 1 to write" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in copy.glob("*.tar*")} == reference


def test_verify_reports_a_damaged_shard(built, capsys):
    _, out, _ = built
    assert build_main(["--verify", str(out), "--split", "train"]) == 0
    shard = sorted(out.glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[600:700] = b"\0" * 100  # inside the first image
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert build_main(["--verify", str(out), "--split", "train"]) == 5
    err = capsys.readouterr().err
    assert f"{shard.name}: size or sha256 differs" in err


@pytest.mark.parametrize("keep", [100, 512, 700, 1024, 1536, -1000, -10])
def test_verify_reports_a_truncated_shard_at_any_cut(built, tmp_path, capsys, keep):
    """A copy cut short (a full disk, an interrupted transfer), wherever the cut falls: reported by
    name, never a traceback, and the other shards still checked."""
    _, out, _ = built
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("*.tar"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    capsys.readouterr()
    assert build_main(["--verify", str(copy), "--split", "train"]) == 5
    captured = capsys.readouterr()
    assert f"{shard.name}: " in captured.err and "Traceback" not in captured.err
    shards = len(list(copy.glob("*.tar")))
    assert f"train: {shards - 1} of {shards} shards OK" in captured.out


def test_flat_val_with_kaggle_csv_devkit_labels_and_train_classes(built, tmp_path):
    _, train_out, _ = built
    val = tmp_path / "val"
    val.mkdir()
    wnids = ["n01000003", "n01000001", "n01000002", "n01000001"]
    from tests.image_trees import jpeg_bytes
    for i, _ in enumerate(wnids):
        (val / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(jpeg_bytes(32, 32, seed=300 + i))
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4 {w} 5 6 7 8\n" for i, w in enumerate(wnids)))
    classes = ["--classes", str(train_out / "train.json"), "--split", "val"]
    assert build(val, tmp_path / "v1", "--val-labels", str(csv), *classes) == 0
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("2 n01000001\n1 n01000002\n3 n01000003\n")  # each line names its ILSVRC id
    ground_truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    ground_truth.write_text("3\n2\n1\n2\n")
    assert (
        build(
            val,
            tmp_path / "v2",
            "--val-labels",
            str(ground_truth),
            "--synsets",
            str(synsets),
            *classes,
        )
        == 0
    )
    for out in (tmp_path / "v1", tmp_path / "v2"):
        manifest = Manifest.load(out / "val.json")
        assert manifest.classes == Manifest.load(train_out / "train.json").classes
        labels = {}
        for tar in out.glob("val-*.tar"):
            for sample in wds.WebDataset(str(tar), shardshuffle=False):
                labels[json.loads(sample["json"])["path"]] = int(sample["cls"])
        assert labels == {
            f"ILSVRC2012_val_{i + 1:08d}.JPEG": manifest.classes.index(w)
            for i, w in enumerate(wnids)
        }


def _error_case(tmp_path, capsys, args: list[str], message: str, out: Path) -> None:
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    capsys.readouterr()
    assert build_main([*args, "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_clear_errors_and_nothing_written(built, tmp_path, capsys):
    src, out, _ = built
    fresh = tmp_path / "fresh"
    _error_case(tmp_path, capsys, [str(tmp_path / "nope"), str(fresh)], "does not exist", fresh)
    (tmp_path / "empty").mkdir()
    _error_case(tmp_path, capsys, [str(tmp_path / "empty"), str(fresh)], "no class folders", fresh)
    (tmp_path / "empty2" / "n1").mkdir(parents=True)
    _error_case(tmp_path, capsys, [str(tmp_path / "empty2"), str(fresh)], "no image files", fresh)
    labels = tmp_path / "labels.csv"
    labels.write_text("ImageId,PredictionString\nx,n09999999 1 2 3 4\n")
    _error_case(
        tmp_path,
        capsys,
        [
            str(src / "n01000001"),
            str(fresh),
            "--val-labels",
            str(labels),
            "--classes",
            str(out / "train.json"),
        ],
        "wnid n09999999 is not one of the 3 known",
        fresh,
    )
    other = tmp_path / "other"
    (other / "n5").mkdir(parents=True)
    (other / "n5" / "x.JPEG").write_bytes((src / "n01000002" / "b_0.JPEG").read_bytes())
    _error_case(
        tmp_path, capsys, [str(other), str(out)], "already holds train shards built from", out
    )


def test_sample_data_is_deterministic(tmp_path):
    from pipeline.sample_data import main as sample_data

    for name in ("a", "b"):
        args = [
            str(tmp_path / name),
            "--classes",
            "2",
            "--train-per-class",
            "3",
            "--val-per-class",
            "1",
        ]
        assert sample_data(args) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.JPEG"))
    assert len(files) == 8
    assert all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
    )


def test_a_shard_finishing_between_two_polls_is_not_lost(tree, tmp_path, monkeypatch):
    """A worker's shard can complete at any moment relative to the parent's polling of the pool."""
    import multiprocessing.pool

    real_ready = multiprocessing.pool.ApplyResult.ready
    seen_done: set[int] = set()

    def ready_one_poll_late(result):
        # The first look after a job completes still says 'not yet', as if it completed just after
        # that look.
        done = real_ready(result)
        if done and id(result) not in seen_done:
            seen_done.add(id(result))
            return False
        return done

    monkeypatch.setattr(multiprocessing.pool.ApplyResult, "ready", ready_one_poll_late)
    src, expected = tree
    out = tmp_path / "out"
    assert build_main([str(src), str(out), "--shard-size-mb", "0.03", "--workers", "2", "--quiet",
                       "--max-pixels", str(MAX_PIXELS)]) == 0
    assert {path: s["label"] for path, s in read_all(out).items()} == expected


def test_the_pixel_limit_is_inclusive(tmp_path):
    """--max-pixels N keeps an image of exactly N pixels and rejects one of N + 1."""
    from pipeline.images import RejectedImage, prepare_image
    from tests.image_trees import jpeg_bytes

    at_limit, over = tmp_path / "at.JPEG", tmp_path / "over.JPEG"
    at_limit.write_bytes(jpeg_bytes(40, 25, seed=1))  # 1000 pixels
    over.write_bytes(jpeg_bytes(1001, 1, seed=2))  # 1001 pixels
    assert prepare_image(at_limit.read_bytes(), max_pixels=1000).width * 25 == 1000
    with pytest.raises(RejectedImage, match="1001x1 exceeds the pixel limit of 1000"):
        prepare_image(over.read_bytes(), max_pixels=1000)


def test_a_split_whose_classes_differ_from_train_is_refused_unless_given_its_list(
    built, tmp_path, capsys
):
    """Val built from class folders with one class missing would shift every later label: the
    builder refuses it, naming the list to pass; with --classes it is labelled in train's list."""
    src, out, _ = built
    val = tmp_path / "val"
    for cls in ("n01000001", "n01000003"):  # n01000002 has no val images
        shutil.copytree(src / cls, val / cls)
    capsys.readouterr()
    assert build(val, out, "--split", "val") == 2
    err = capsys.readouterr().err
    assert (
        "val's classes differ from train.json's (3 vs 2 classes: 1 missing (first n01000002))"
        in err
    )
    assert f"--classes {out / 'train.json'}" in err and not (out / "val.json").exists()
    assert build(val, out, "--split", "val", "--classes", str(out / "train.json")) == 0
    assert Manifest.load(out / "val.json").classes == Manifest.load(out / "train.json").classes


def test_the_shuffle_labels_at_most_its_sort_buffer_at_once_and_the_order_is_the_same(tmp_path):
    """The sort buffer bounds every group of the listing that is labelled and sorted in memory (what
    the shuffle holds at once: `bench shards` measures its memory); the parts it forces change
    neither the order (the plan's fingerprint) nor the shards."""
    from bench.shards import simulated_listing
    from pipeline.build_shards import BuildOptions, shuffled
    from pipeline.shard_labels import ClassFolders
    from pipeline.shard_listing import Listing

    class CountedGroups(ClassFolders):
        def label(self, group, rejected):
            groups.append(len(group))
            return super().label(group, rejected)

    plans, groups_of = {}, {}
    for buffer in (8, 10**6):
        groups = groups_of[buffer] = []
        work = tmp_path / str(buffer)
        work.mkdir()
        options = BuildOptions(src=work, out=work, sort_buffer=buffer, shard_size_mb=10)
        _, plan, fingerprint = shuffled(
            options, CountedGroups(Listing(simulated_listing(3_000)), None, []), work, []
        )
        plans[buffer] = plan.shard_sizes, fingerprint
        assert sum(groups) == 3_000
    # without a buffer a part is about 3,000 / 256 = 12
    assert max(groups_of[8]) <= 8 < max(groups_of[10**6])
    assert plans[8] == plans[10**6]


def test_the_builders_memory_does_not_grow_with_the_images_it_rejects(tmp_path):
    """Reports go to disk as they are met: a listing with ten times as many damaged entries costs
    the plan no more memory (a data set of millions of them would otherwise hold every report until
    the manifest is written)."""
    from bench.shards import simulated_listing
    from pipeline.archives import Entry
    from pipeline.build_shards import BuildOptions, shuffled
    from pipeline.shard_labels import ClassFolders
    from pipeline.shard_listing import Listing
    from pipeline.shard_reports import ReportSpill

    def planned(damaged: int) -> tuple[int, int]:
        """Peak memory while planning 500 images beside `damaged` entries cut short, and the reports
        made."""
        entries = itertools.chain(
            simulated_listing(500),
            (Entry(f"n0/cut_{i}.JPEG", "/data", 0, problem="cut short") for i in range(damaged)),
        )
        work = tmp_path / str(damaged)
        work.mkdir()
        with ReportSpill(work / "skipped.jsonl") as skipped:
            labels = ClassFolders(Listing(entries), None, skipped)
            tracemalloc.start()
            shuffled(BuildOptions(src=work, out=work), labels, work, skipped)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return peak, len(list(skipped))

    (few, reported_few), (many, reported_many) = planned(1_000), planned(10_000)
    assert (reported_few, reported_many) == (1_000, 10_000)
    # held in memory, 9,000 more reports would take over 2 MB
    assert many - few < 2**19, (few, many)


def test_a_manifest_in_a_format_this_maeflow_does_not_read_is_refused_naming_it(built, capsys):
    """The format policy (pipeline.formats): a manifest says its format, and one of another is
    refused in one line, by the loader and by a rebuild into the same folder, never read as if it
    were this one."""
    src, out, _ = built
    raw = json.loads((out / "train.json").read_text())
    assert raw["format"] == VERSIONS["manifest"]
    for written in (
        {k: v for k, v in raw.items() if k != "format"},
        {**raw, "format": VERSIONS["manifest"] + 1},
    ):
        (out / "train.json").write_text(json.dumps(written))
        with pytest.raises(
            FormatError,
            match=r"train\.json is a manifest in format .+ and this maeflow reads format",
        ):
            Manifest.load(out / "train.json")
        assert build(src, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "train.json is a manifest in format" in err[0], err


def test_every_shard_index_and_manifest_is_on_the_disk_before_it_is_relied_on(
    tree, tmp_path, monkeypatch
):
    """A tar and its index reach the disk (fsync) before they are renamed into place, their folder
    after; the manifest, which marks the split complete, goes last. Recorded from the worker
    processes too, through a file."""
    log = tmp_path / "events.txt"
    fsync, replace = os.fsync, os.replace

    def note(line: str) -> None:
        with open(log, "a") as f:
            f.write(line + "\n")

    def recorded_fsync(fd):
        note(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        return fsync(fd)

    def recorded_replace(src, dst, *args, **kwargs):
        note(f"replace {src} {dst}")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    out = tmp_path / "out"
    assert build(tree[0], out, "--workers", "2") == 0
    events = log.read_text().splitlines()
    tars = sorted(out.glob("train-*.tar"))
    assert len(tars) >= 2
    manifest = events.index(f"replace {out / 'train.json.tmp'} {out / 'train.json'}")
    for path in [*tars, *(t.with_suffix(".idx") for t in tars)]:
        in_place = events.index(f"replace {path}.tmp {path}")
        assert (
            events.index(f"fsync {path}.tmp")
            < in_place
            < events.index(f"fsync {out}", in_place)
            < manifest
        )
