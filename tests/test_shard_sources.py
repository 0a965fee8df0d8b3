"""Shards from the containers users download, built with the standard library here, never extracted
by the
builder: the same images give byte-identical shards whichever container holds them; bad archives are
reported and lose nothing good; unlabeled collections and existing WebDataset tars."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.build_shards import main as build_main
from pipeline.manifest import Manifest
from tests.image_trees import MAX_PIXELS, jpeg_bytes, png_bytes, write_tree


def build(src: Path, out: Path, *extra: str) -> int:
    return build_main([str(src), str(out), "--shard-size-mb", "0.03", "--workers", "2", "--quiet",
                       "--max-pixels", str(MAX_PIXELS), *extra])


def shard_bytes(out: Path, split: str = "train") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith(f"{split}-")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The builder's test tree (good, converted and bad images in three classes) and its shards."""
    root = tmp_path_factory.mktemp("containers")
    write_tree(root / "train")
    assert build(root / "train", root / "from_tree") == 0
    return root


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def class_files(tree_root: Path) -> dict[str, list[Path]]:
    return {c.name: sorted(c.iterdir()) for c in sorted((tree_root / "train").iterdir())}


def tar_of_class_tars(tree: Path, target: Path) -> Path:
    """ImageNet-1k's train tar: one tar per class inside one tar, members in no particular order."""
    with tarfile.open(target, "w") as outer:
        for cls, files in reversed(list(class_files(tree).items())):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for f in reversed(files):
                    add_bytes(tar, f.name, f.read_bytes())
            add_bytes(outer, f"{cls}.tar", inner.getvalue())
    return target


def class_folder_archive(tree: Path, target: Path) -> Path:
    """A tar, .tar.gz or zip of the tree under a parent folder, the way `tar czf train.tar.gz
    train/` makes it."""
    if target.suffix == ".zip":
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
            for cls, files in class_files(tree).items():
                for f in files:
                    zf.write(f, f"train/{cls}/{f.name}")
        return target
    with tarfile.open(target, "w:gz" if target.name.endswith(".gz") else "w") as tar:
        tar.add(tree / "train", arcname="train")
    return target


def kaggle_zip(tree: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as zf:  # stored, as the Kaggle download's JPEGs are
        for cls, files in class_files(tree).items():
            for f in files:
                zf.write(f, f"ILSVRC/Data/CLS-LOC/train/{cls}/{f.name}")
        zf.writestr("LOC_synset_mapping.txt", "\n".join(class_files(tree)))
    return target


def per_class_tars(tree: Path, folder: Path) -> Path:
    """ImageNet-21k as distributed: a folder of per-synset tars."""
    folder.mkdir()
    for cls, files in class_files(tree).items():
        with tarfile.open(folder / f"{cls}.tar", "w") as tar:
            for f in files:
                tar.add(f, arcname=f.name)
    return folder


CONTAINERS = {
    "imagenet_train_tar_of_tars": lambda tree, tmp: tar_of_class_tars(
        tree, tmp / "ILSVRC2012_img_train.tar"
    ),
    "class_folder_tar": lambda tree, tmp: class_folder_archive(tree, tmp / "train.tar"),
    "class_folder_tar_gz": lambda tree, tmp: class_folder_archive(tree, tmp / "train.tar.gz"),
    "class_folder_zip": lambda tree, tmp: class_folder_archive(tree, tmp / "train.zip"),
    "kaggle_zip": lambda tree, tmp: kaggle_zip(
        tree, tmp / "imagenet-object-localization-challenge.zip"
    ),
    "imagenet21k_folder_of_tars": lambda tree, tmp: per_class_tars(tree, tmp / "winter21"),
}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_the_same_images_give_the_same_shards_whichever_container_holds_them(
    tree, tmp_path, container
):
    src = CONTAINERS[container](tree, tmp_path)
    out = tmp_path / "shards"
    assert build(src, out) == 0
    assert shard_bytes(out) == shard_bytes(tree / "from_tree")  # keys, bytes, labels, order
    for ext in (".idx",):
        assert {p.name for p in out.glob(f"*{ext}")} == {
            p.name for p in (tree / "from_tree").glob(f"*{ext}")
        }
    ours, theirs = (
        Manifest.load(out / "train.json"),
        Manifest.load(tree / "from_tree" / "train.json"),
    )
    assert (ours.classes, ours.samples, ours.plan) == (theirs.classes, theirs.samples, theirs.plan)
    assert sorted(r["path"] for r in Manifest.reports(out, "train", "rejected")) == sorted(
        r["path"] for r in Manifest.reports(tree / "from_tree", "train", "rejected"))
    # a .tar.gz's temporary tar is gone once the build is done
    assert not (out / ".scratch").exists()
    assert build_main(["--verify", str(out)]) == 0


def test_an_interrupted_archive_build_resumes_and_keeps_its_finished_shards(tree, tmp_path):
    src = class_folder_archive(tree, tmp_path / "train.tar.gz")
    out = tmp_path / "shards"
    assert build(src, out) == 0
    first = sorted(out.glob("train-*.tar"))[0]
    stamp = first.stat().st_mtime_ns
    (out / "train.json").unlink()
    sorted(out.glob("train-*.tar"))[-1].unlink()  # as if killed before the last shard
    assert build(src, out) == 0
    assert first.stat().st_mtime_ns == stamp and shard_bytes(out) == shard_bytes(tree / "from_tree")


def test_val_from_the_imagenet_val_tar_and_the_devkit_archive(tree, tmp_path):
    """ILSVRC2012_img_val.tar (flat JPEGs) labelled from ILSVRC2012_devkit_t12.tar.gz, read in
    place; the same shards as the extracted folder with the ground-truth file and a synsets list."""
    classes = list(class_files(tree))
    folder = tmp_path / "val"
    folder.mkdir()
    truth = []
    for i in range(9):
        (folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(jpeg_bytes(48, 40, seed=300 + i))
        truth.append(str(i % 3 + 1))  # ILSVRC ids 1..3 = the classes in order
    (tmp_path / "truth.txt").write_text("\n".join(truth) + "\n")
    (tmp_path / "synsets.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    with tarfile.open(tmp_path / "ILSVRC2012_img_val.tar", "w") as tar:
        for f in sorted(folder.iterdir()):
            tar.add(f, arcname=f.name)
    with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                  (tmp_path / "truth.txt").read_bytes())
        add_bytes(
            tar, "ILSVRC2012_devkit_t12/data/meta.mat", devkit_meta_mat(classes, compressed=True)
        )
    train = tree / "from_tree" / "train.json"
    common = ["--split", "val", "--classes", str(train)]
    assert (
        build(
            folder,
            tmp_path / "a",
            *common,
            "--val-labels",
            str(tmp_path / "truth.txt"),
            "--synsets",
            str(tmp_path / "synsets.txt"),
        )
        == 0
    )
    # The README's command: the devkit archive alone, its meta.mat read in place (no scipy needed).
    assert build(tmp_path / "ILSVRC2012_img_val.tar", tmp_path / "b", *common, "--val-labels",
                 str(tmp_path / "ILSVRC2012_devkit_t12.tar.gz")) == 0
    (tmp_path / "meta.mat").write_bytes(devkit_meta_mat(classes, compressed=False))
    assert (
        build(
            folder,
            tmp_path / "c",
            *common,
            "--val-labels",
            str(tmp_path / "truth.txt"),
            "--synsets",
            str(tmp_path / "meta.mat"),
        )
        == 0
    )
    assert shard_bytes(tmp_path / "a", "val") == shard_bytes(tmp_path / "b", "val") == shard_bytes(
        tmp_path / "c", "val") != {}
    assert Manifest.load(tmp_path / "b" / "val.json").samples == 9


def devkit_meta_mat(classes: list[str], compressed: bool) -> bytes:
    """The devkit's meta.mat as MATLAB lays it out (a struct array `synsets`, one row per synset:
    the classes first, ids 1..N, then inner synsets of the hierarchy), written by scipy."""
    import numpy as np
    from scipy.io import savemat

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = np.zeros((len(classes) + 2, 1), dtype=[(f, "O") for f in fields])
    for i, wnid in enumerate([*classes, "n00001740", "n00002137"]):
        inner = i >= len(classes)
        rows[i, 0] = (
            np.array([[i + 1.0]]),
            wnid,
            f"synset {i}",
            "a gloss",
            np.array([[2.0 if inner else 0.0]]),
            np.array([[1.0, 2.0]]) if inner else np.zeros((1, 0)),
            np.array([[0.0]]),
            np.array([[732.0]]),
        )
    out = io.BytesIO()
    savemat(out, {"synsets": rows}, do_compression=compressed)
    return out.getvalue()


def test_val_ids_are_never_mapped_to_classes_through_an_unchecked_list(tree, tmp_path, capsys):
    """A synsets.txt sorted by wnid (the usual file of that name) is not in ILSVRC id order:
    refused, not used."""
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg_bytes(48, 40, seed=300))
    (tmp_path / "truth.txt").write_text("1\n")
    classes = list(class_files(tree))
    for listing in (sorted(classes), list(reversed(classes))):
        (tmp_path / "synsets.txt").write_text("\n".join(listing) + "\n")
        capsys.readouterr()
        assert (
            build(
                folder,
                tmp_path / "out",
                "--split",
                "val",
                "--classes",
                str(tree / "from_tree" / "train.json"),
                "--val-labels",
                str(tmp_path / "truth.txt"),
                "--synsets",
                str(tmp_path / "synsets.txt"),
            )
            == 2
        )
        assert "expected '<ILSVRC2012_ID> <wnid>'" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_kaggle_val_takes_its_labels_from_the_csv_inside_the_zip(tree, tmp_path):
    classes = list(class_files(tree))
    rows = ["ImageId,PredictionString"]
    with zipfile.ZipFile(tmp_path / "kaggle.zip", "w") as zf:
        for i in range(6):
            stem = f"ILSVRC2012_val_{i + 1:08d}"
            zf.writestr(f"ILSVRC/Data/CLS-LOC/val/{stem}.JPEG", jpeg_bytes(40, 40, seed=400 + i))
            rows.append(f"{stem},{classes[i % 3]} 1 2 3 4")
        zf.writestr("LOC_val_solution.csv", "\n".join(rows) + "\n")
    out = tmp_path / "shards"
    train = tree / "from_tree" / "train.json"
    assert build(tmp_path / "kaggle.zip", out, "--split", "val", "--classes", str(train)) == 0
    samples = list(
        wds.WebDataset([str(p) for p in sorted(out.glob("val-*.tar"))], shardshuffle=False)
    )
    assert sorted(int(s["cls"]) for s in samples) == [0, 0, 1, 1, 2, 2]


def test_bad_archives_are_reported_and_lose_nothing_good(tmp_path):
    """Non-images, hidden files, names with .. or an absolute path, spaces and non-ASCII names,
    links, the same file name in two classes, an empty class and a corrupt inner tar, in ImageNet's
    tar-of-tars layout."""
    good = {"n1": {"a b.JPEG": jpeg_bytes(40, 40, seed=1), "é.JPEG": jpeg_bytes(40, 40, seed=2),
                   "same.JPEG": jpeg_bytes(40, 40, seed=3)},
            "n2": {"same.JPEG": jpeg_bytes(40, 40, seed=4), "x.png": png_bytes(30, 30, seed=5)}}
    with tarfile.open(tmp_path / "train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        for cls, files in good.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for name, data in files.items():
                    add_bytes(tar, name, data)
                add_bytes(tar, "README.txt", b"not an image\n")
                add_bytes(tar, ".DS_Store", b"\0\0")
                add_bytes(tar, "../escape.JPEG", jpeg_bytes(20, 20, seed=6))
                add_bytes(tar, "/abs.JPEG", jpeg_bytes(20, 20, seed=7))
                link = tarfile.TarInfo("link.JPEG")
                link.type, link.linkname = tarfile.SYMTYPE, "same.JPEG"
                tar.addfile(link)
            add_bytes(outer, f"{cls}.tar", inner.getvalue())
        empty = io.BytesIO()
        tarfile.open(fileobj=empty, mode="w").close()
        add_bytes(outer, "n0_empty.tar", empty.getvalue())
        add_bytes(outer, "n3_corrupt.tar", b"this is not a tar" * 40)
    out = tmp_path / "shards"
    assert build(tmp_path / "train.tar", out) == 0
    manifest = Manifest.load(out / "train.json")
    # Every class keeps its index, the empty and the damaged one too: no label shifts.
    assert manifest.classes == ["n0_empty", "n1", "n2", "n3_corrupt"] and manifest.samples == 5
    reasons = {r["path"]: r["reason"] for r in Manifest.reports(out, "train", "rejected")}
    assert (
        "not an image" in reasons["n1/README.txt"]
        and "not a readable tar" in reasons["n3_corrupt.tar"]
    )
    assert (
        "leaves the archive" in reasons["n1/../escape.JPEG"]
        and "absolute" in reasons["n1//abs.JPEG"]
    )
    assert "a link" in reasons["n1/link.JPEG"]
    samples = list(
        wds.WebDataset([str(p) for p in sorted(out.glob("train-*.tar"))], shardshuffle=False)
    )
    paths = sorted(json.loads(s["json"])["path"] for s in samples)
    assert paths == ["n1/a b.JPEG", "n1/same.JPEG", "n1/é.JPEG", "n2/same.JPEG", "n2/x.png"]


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_a_truncated_archive_keeps_every_whole_image_and_names_the_cut(tree, tmp_path, cut):
    src = tar_of_class_tars(tree, tmp_path / "train.tar")
    data = src.read_bytes()
    src.write_bytes(data[: int(len(data) * cut)])
    out = tmp_path / "shards"
    assert build(src, out) == 0
    manifest = Manifest.load(out / "train.json")
    rejected = list(Manifest.reports(out, "train", "rejected"))
    assert any("cut short" in r["reason"] or "ends early" in r["reason"] for r in rejected), (
        rejected
    )
    full = Manifest.load(tree / "from_tree" / "train.json").samples
    assert 0 < manifest.samples < full if cut > 0.5 else manifest.samples < full
    assert build_main(["--verify", str(out)]) == 0  # what was written is whole


def test_an_unlabeled_collection_at_any_depth_and_a_file_list(tmp_path):
    root = tmp_path / "photos"
    for i, rel in enumerate(["a.jpg", "trip/b.jpg", "trip/day2/c.png", ".hidden/d.jpg"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(
            jpeg_bytes(40, 30, seed=i) if rel.endswith("jpg") else png_bytes(30, 30, seed=i)
        )
    out = tmp_path / "shards"
    assert build(root, out, "--unlabeled") == 0
    manifest = Manifest.load(out / "train.json")
    assert manifest.classes == [] and manifest.samples == 3
    samples = list(
        wds.WebDataset([str(p) for p in sorted(out.glob("train-*.tar"))], shardshuffle=False)
    )
    assert sorted(json.loads(s["json"])["path"] for s in samples) == [
        "a.jpg",
        "trip/b.jpg",
        "trip/day2/c.png",
    ]
    assert {int(s["cls"]) for s in samples} == {-1}  # "no label", which the loaders read as -1
    listing = tmp_path / "list.txt"
    listing.write_text("photos/a.jpg 3\nphotos/trip/b.jpg 0\n# a comment\n\nphotos/missing.jpg 1\n")
    assert build(listing, tmp_path / "listed", "--file-list") == 0
    listed = Manifest.load(tmp_path / "listed" / "train.json")
    assert listed.classes == ["0", "1", "2", "3"] and listed.samples == 2
    assert list(Manifest.reports(tmp_path / "listed", "train", "rejected")) == [
        {"path": "photos/missing.jpg", "reason": "line 5 of list.txt: no such file"}]


def test_existing_webdataset_tars_are_repacked_keeping_keys_and_metadata(tmp_path):
    """img2dataset's layout: <key>.jpg/.webp with .txt and .json beside; repacked, converted where
    DALI cannot decode, shuffled, indexed, the original key and text kept in each sample's json."""
    from PIL import Image

    folder = tmp_path / "img2dataset"
    folder.mkdir()
    webp = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(webp, "WEBP")
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                image = webp.getvalue() if i == 1 else jpeg_bytes(40, 30, seed=10 * shard + i)
                add_bytes(tar, f"{key}.{'webp' if i == 1 else 'jpg'}", image)
                add_bytes(tar, f"{key}.txt", f"caption {key}".encode())
                add_bytes(
                    tar, f"{key}.json", json.dumps({"url": f"http://x/{key}", "width": 40}).encode()
                )
            add_bytes(tar, "orphan.txt", b"no image")
    out = tmp_path / "shards"
    assert build(folder, out, "--webdataset") == 0
    manifest = Manifest.load(out / "train.json")
    assert manifest.samples == 6 and manifest.classes == [] and manifest.converted == 2
    samples = list(
        wds.WebDataset([str(p) for p in sorted(out.glob("train-*.tar"))], shardshuffle=False)
    )
    metas = sorted((json.loads(s["json"]) for s in samples), key=lambda m: m["key"])
    assert [m["key"] for m in metas] == [f"{s:05d}{i:04d}" for s in range(2) for i in range(3)]
    assert (
        metas[0]["txt"] == "caption 000000000" and metas[0]["json"]["url"] == "http://x/000000000"
    )
    assert any(r["path"].endswith("orphan") for r in Manifest.reports(out, "train", "rejected"))
    assert build_main(["--verify", str(out)]) == 0


def test_one_input_kind_at_a_time(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_main([str(tmp_path), str(tmp_path / "out"), "--unlabeled", "--webdataset"])
    assert "--unlabeled and --webdataset are different inputs" in capsys.readouterr().err
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    assert build_main([str(tmp_path / "broken.zip"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "broken.zip: not a readable zip" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_unlabeled_shards_train_and_evaluation_says_it_needs_labels(tmp_path, capsys):
    """MAE needs no labels: a run on unlabeled shards trains; the k-NN monitor and the evaluator say
    plainly why they do not run."""
    from pipeline.sample_data import main as sample_data
    from tests.runs import metrics, run
    from train.evaluate import main as evaluate_main

    sample_data(
        [
            str(tmp_path / "images"),
            "--classes",
            "4",
            "--train-per-class",
            "8",
            "--val-per-class",
            "2",
        ]
    )
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        assert (
            build_main(
                [
                    str(tmp_path / "images" / split),
                    str(shards),
                    "--split",
                    split,
                    "--unlabeled",
                    "--shard-size-mb",
                    "0.5",
                    "--workers",
                    "1",
                    "--quiet",
                ]
            )
            == 0
        )
    out = run(
        shards,
        tmp_path / "run",
        "--max-steps",
        "4",
        "--log-every",
        "1",
        "--set",
        "eval.every_epochs=1",
        ranks=1,
    )
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert "k-NN evaluation off: the train shards" in out and "are unlabeled" in out
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "run"), "--data", str(shards), "--probe-epochs", "0"]) == 2
    assert (
        "are unlabeled: evaluation needs labelled train and val splits" in capsys.readouterr().err
    )


def test_zip_members_with_a_local_header_extra_field_are_read_at_their_data(tree, tmp_path):
    """Zips made by common tools (Info-ZIP's `zip`) put an extended-timestamp field in each local
    header, which Python's zipfile does not: the member's bytes start after it."""
    import struct

    target = tmp_path / "train.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for cls, files in class_files(tree).items():
            for f in files:
                info = zipfile.ZipInfo(f"train/{cls}/{f.name}", date_time=(2012, 5, 1, 12, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                # "UT": mtime, atime
                info.extra = struct.pack("<HHBII", 0x5455, 9, 3, 1336000000, 1336000000)
                zf.writestr(info, f.read_bytes())
    # the field is there, in the local header too
    assert zipfile.ZipFile(target).infolist()[0].extra
    out = tmp_path / "shards"
    assert build(target, out) == 0
    assert shard_bytes(out) == shard_bytes(tree / "from_tree")


def test_a_tar_of_the_folders_contents_with_dot_slash_names_builds(tree, tmp_path):
    """`tar -C train -cf train.tar .`: members named ./n01440764/x.JPEG, and a member "." for the
    folder itself."""
    import subprocess

    target = tmp_path / "train.tar"
    subprocess.run(["tar", "-C", str(tree / "train"), "-cf", str(target), "."], check=True)
    with tarfile.open(target) as tar:
        assert any(name.startswith("./") for name in tar.getnames())
    out = tmp_path / "shards"
    assert build(target, out) == 0
    assert shard_bytes(out) == shard_bytes(tree / "from_tree")


def test_webdataset_members_with_several_dots_stay_one_sample(tmp_path):
    """A sample's key is its name up to the first dot: k1.jpg, k1.seg.png and k1.seg.json are one
    sample."""
    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(3):
            add_bytes(tar, f"k{i}.jpg", jpeg_bytes(40, 30, seed=i))
            add_bytes(tar, f"k{i}.seg.png", png_bytes(40, 30, seed=i))
            add_bytes(tar, f"k{i}.seg.json", json.dumps({"mask": i}).encode())
            add_bytes(tar, f"k{i}.txt", f"caption {i}".encode())
    out = tmp_path / "shards"
    assert build(folder, out, "--webdataset") == 0
    manifest = Manifest.load(out / "train.json")
    assert manifest.samples == 3 and not manifest.rejected
    samples = list(
        wds.WebDataset([str(p) for p in sorted(out.glob("train-*.tar"))], shardshuffle=False)
    )
    assert sorted(json.loads(s["json"])["key"] for s in samples) == ["k0", "k1", "k2"]


def test_a_stray_non_image_in_the_container_changes_no_shard(tree, tmp_path):
    """A Thumbs.db in one class of the archive (and not in the extracted tree): reported, and the
    shards are the tree's, byte for byte: the shuffle follows the images alone."""
    target = class_folder_archive(tree, tmp_path / "train.tar")
    cls = next(iter(class_files(tree)))
    with tarfile.open(target, "a") as tar:
        # an OLE2 file
        add_bytes(tar, f"train/{cls}/Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    out = tmp_path / "shards"
    assert build(target, out) == 0
    assert shard_bytes(out) == shard_bytes(tree / "from_tree")
    assert {
        "path": f"{cls}/Thumbs.db",
        "reason": "not an image (format not recognised)",
    } in Manifest.reports(out, "train", "rejected")


def test_linked_class_folders_are_read_and_a_walk_at_any_depth_never_goes_round_a_link(tmp_path):
    """A subset made of links to class folders builds like the folders; a link back up the tree is
    not followed."""
    photos = tmp_path / "photos"
    (photos / "n1").mkdir(parents=True)
    (photos / "n1" / "x.jpg").write_bytes(jpeg_bytes(40, 40, seed=1))
    (photos / "n1" / "up").symlink_to(photos)
    assert build(photos, tmp_path / "unlabeled", "--unlabeled") == 0
    assert Manifest.load(tmp_path / "unlabeled" / "train.json").samples == 1
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "n1").symlink_to(photos / "n1")
    assert build(subset, tmp_path / "linked") == 0
    assert Manifest.load(tmp_path / "linked" / "train.json").classes == ["n1"]
    assert Manifest.load(tmp_path / "linked" / "train.json").samples == 1


def test_listing_a_tar_holds_none_of_its_headers(tmp_path):
    """A tar of millions of images is listed in memory that does not grow with it (tarfile keeps
    every header it reads unless told otherwise): ten times the members, the same peak."""
    import tracemalloc

    from bench.shards import tiny_images_archive
    from pipeline.archives import tar_archive_entries

    peaks = []
    for members in (1_000, 10_000):
        archive = tiny_images_archive(members, tmp_path / f"{members}.tar")
        tracemalloc.start()
        files = sum(1 for entry in tar_archive_entries(archive, tmp_path, []) if not entry.problem)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert files == members
    assert peaks[1] - peaks[0] < 2**19, peaks  # 9,000 more headers held would take over 4 MB
