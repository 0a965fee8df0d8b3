"""What a shard build reads, wherever it lies, and which label each image gets.

Inputs (see `pipeline.archives` for reading inside archives):
- a class-folder tree `SRC/<class>/<image>`, or a tar, .tar.gz or zip whose member paths carry the class as
  the folder holding the image (`train/n01440764/x.JPEG`);
- ImageNet-1k's train tar (a tar of per-class tars) and ImageNet-21k (a folder of per-synset tars, or a tar of
  them): each inner tar is a class;
- the Kaggle ImageNet zip (`ILSVRC/Data/CLS-LOC/<split>/...`, its `LOC_val_solution.csv` inside);
- a flat val folder or archive with its labels: the Kaggle CSV, or the devkit's ground truth (ILSVRC ids mapped
  to wnids through meta.mat or a synsets text file), also read from inside the devkit's .tar.gz;
- unlabeled: every image under SRC at any depth, or a file list (a path per line, optionally a label).

A label is the class's index in the sorted class list (empty classes included, so a class with no images
shifts nothing), or in a list reused from the train manifest (`--classes`) so val labels match train's.
The same images give the same list, in the same order, with the same names, whichever container holds them;
so they give the same shards.
"""

from __future__ import annotations

import json
import posixpath
import struct
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.archives import (
    ArchiveError,
    Entry,
    archive_entries,
    basename,
    folder_entries,
    is_archive,
    read_entry,
    tar_entries,
)
from pipeline.matfile import MatFileError, read_mat

UNLABELED = -1
KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC/"
KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"
IGNORED_FOLDERS = ("__MACOSX",)  # macOS archive clutter
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm",
                  ".pgm", ".pbm", ".tga", ".ico")
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"P4", b"P5", b"P6")


class BuildError(Exception):
    """A problem with the command's inputs or OUT: reported in one line, nothing written."""


@dataclass(frozen=True)
class SourceImage:
    entry: Entry
    """where its bytes are"""
    rel: str
    """its name in the data set (`<class>/<file>`, or its path for unlabeled data), kept in the sample's json"""
    class_name: str
    label: int
    """index in the class list, or UNLABELED"""
    side: tuple[tuple[str, Entry], ...] = ()
    """a repacked WebDataset sample's other members (ext, entry): their text goes into the sample's json"""
    key: str = ""
    """a repacked WebDataset sample's original key, kept in the sample's json"""

    @property
    def size(self) -> int:
        return self.entry.size

    def read(self) -> bytes:
        return read_entry(self.entry)


def read_class_list(path: Path) -> list[str]:
    """Classes from a manifest (`train.json`) or a text file with one class name first on each line."""
    if not path.is_file():
        raise BuildError(f"--classes {path}: no such file")
    if path.suffix == ".json":
        return list(json.loads(path.read_text())["classes"])
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- listing the input


@dataclass
class Listing:
    """The input's files as entries, the problems met listing them, and a labels file found beside them."""

    entries: list[Entry]
    problems: list[dict]
    val_labels: Entry | None = None  # the Kaggle zip's LOC_val_solution.csv


def source_entries(src: Path, split: str, scratch: Path, any_depth: bool = False) -> Listing:
    """List SRC. A Kaggle-layout archive is narrowed to `split`'s folder; a folder holding only tars is a folder
    of per-class tars (ImageNet-21k as distributed)."""
    if src.is_dir():
        tars = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(".tar"))
        if tars and not any(p.is_dir() and not p.name.startswith(".") for p in src.iterdir()):
            return Listing(*_per_class_tars(tars))
        return Listing(folder_entries(src, None if any_depth else 2), [])
    if not is_archive(src):
        raise BuildError(f"SRC {src} is not a folder, a tar, a .tar.gz or a zip")
    try:
        entries, problems = archive_entries(src, scratch)
    except ArchiveError as err:
        raise BuildError(str(err)) from None
    labels = next((e for e in entries if basename(e.name) == KAGGLE_VAL_LABELS and not e.problem), None)
    kaggle = KAGGLE_ROOT + split + "/"
    if any(e.name.startswith(kaggle) for e in entries):
        entries = [Entry(**{**e.__dict__, "name": e.name[len(kaggle):]}) for e in entries if e.name.startswith(kaggle)]
    return Listing(entries, problems, labels)


def _per_class_tars(tars: list[Path]) -> tuple[list[Entry], list[dict]]:
    entries, problems = [], []
    for tar in tars:
        prefix = tar.name[:-4] + "/"
        entries.append(Entry(prefix, str(tar), 0, problem="a folder"))
        try:
            found, trouble = tar_entries(tar, display=tar.name, prefix=prefix)
        except ArchiveError as err:
            problems.append({"path": tar.name, "reason": str(err)})
            continue
        entries += found
        problems += trouble
    return entries, problems


def _usable(entries: list[Entry], rejected: list[dict]) -> list[Entry]:
    """File entries that can be read, hidden files left out; the others reported in `rejected`."""
    usable = []
    for entry in entries:
        if entry.problem == "a folder":
            continue
        if entry.problem:
            rejected.append({"path": entry.name, "reason": entry.problem})
            continue
        if any(p.startswith(".") or p in IGNORED_FOLDERS for p in entry.name.split("/")):
            continue  # hidden files and archive clutter, as a folder listing leaves them out
        usable.append(entry)
    return usable


def images_only(images: list[SourceImage], rejected: list[dict]) -> list[SourceImage]:
    """The listed files that are images by their name or by their first bytes; the others (a Thumbs.db, a README)
    reported in `rejected` here, so that they never take a place in the shuffle: the shards follow the images
    alone, whatever else lies beside them. (The writers decode and check every image that stays.)"""
    kept = []
    for image in images:
        if image.entry.name.lower().endswith(IMAGE_SUFFIXES) or _image_signature(image.entry):
            kept.append(image)
        else:
            rejected.append({"path": image.rel, "reason": "not an image (format not recognised)"})
    return kept


def _image_signature(entry: Entry) -> bool:
    try:
        head = read_entry(entry, head=16)
    except OSError:
        return True  # damaged there: the writer reports it with its reason
    return head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


# ---------------------------------------------------------------- labels


def class_folder_images(entries: list[Entry], classes: list[str] | None, rejected: list[dict]) -> tuple[
        list[str], list[SourceImage]]:
    """Images named `.../<class>/<file>`: the class is the folder holding the file."""
    files = _usable(entries, rejected)
    depths = {name.count("/") for name in (e.name for e in files)} - {0}
    if not depths:
        if any(e.problem == "a folder" for e in entries):
            raise BuildError("no image files found")
        raise BuildError("no class folders found (expected SRC/<class>/<image>, or pass --val-labels or --unlabeled)")
    depth = max(depths, key=lambda d: sum(e.name.count("/") == d for e in files))
    folders = {basename(e.name) for e in entries
               if e.problem == "a folder" and e.name.rstrip("/").count("/") == depth - 1
               and not basename(e.name).startswith(".") and basename(e.name) not in IGNORED_FOLDERS}
    images = []
    for entry in files:
        if entry.name.count("/") != depth:
            where = "outside any class folder" if "/" not in entry.name else "not at the class folders' depth"
            rejected.append({"path": entry.name, "reason": f"{where}: skipped"})
            continue
        images.append(entry)
    found = sorted(folders | {posixpath.basename(posixpath.dirname(e.name)) for e in images})
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise BuildError(f"class folder {unknown[0]} is not in the class list given by --classes")
    label = {name: i for i, name in enumerate(classes)}
    listed = []
    for entry in images:
        cls, name = posixpath.basename(posixpath.dirname(entry.name)), basename(entry.name)
        listed.append(SourceImage(entry, f"{cls}/{name}", cls, label[cls]))
    return classes, sorted(listed, key=lambda image: (image.class_name, basename(image.rel)))


def unlabeled_images(entries: list[Entry], rejected: list[dict]) -> list[SourceImage]:
    """Every image, named by its path, with no label (MAE pre-training needs none)."""
    return sorted((SourceImage(e, e.name, "", UNLABELED) for e in _usable(entries, rejected)),
                  key=lambda image: image.rel.split("/"))


def file_list_images(listing: Path, rejected: list[dict]) -> tuple[list[str], list[SourceImage]]:
    """`path [label]` per line (paths relative to the list's folder). Integer labels are kept as given (the class
    list is then 0..max); without labels the images are unlabeled."""
    if not listing.is_file():
        raise BuildError(f"--file-list {listing}: no such file")
    rows = []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        labelled_line = len(parts) > 1 and parts[-1].isdigit()
        path, label = (line.strip().rsplit(None, 1)[0], parts[-1]) if labelled_line else (line.strip(), "")
        file = Path(path) if Path(path).is_absolute() else listing.parent / path
        if not file.is_file():
            rejected.append({"path": path, "reason": f"line {number} of {listing.name}: no such file"})
            continue
        rows.append((path, file, int(label) if label else UNLABELED))
    labelled = [r for r in rows if r[2] != UNLABELED]
    if labelled and len(labelled) != len(rows):
        raise BuildError(f"{listing}: {len(labelled)} of {len(rows)} lines have a label: give every line one, or none")
    classes = [str(i) for i in range(max(r[2] for r in labelled) + 1)] if labelled else []
    images = [SourceImage(Entry(path, str(file), file.stat().st_size), path, str(label) if labelled else "", label)
              for path, file, label in rows]
    return classes, sorted(images, key=lambda image: image.rel.split("/"))


WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp")
WEBDATASET_TEXT = ("txt", "json")


def webdataset_images(entries: list[Entry], rejected: list[dict]) -> tuple[list[str], list[SourceImage]]:
    """Samples of existing WebDataset tars (img2dataset's: an image with .txt/.json beside it, maybe a .cls): a
    sample is the members sharing a key (the path up to the first dot of the name). Their `.cls` integers are the
    labels (the class list is then 0..max); without them the samples are unlabeled."""
    groups: dict[str, dict[str, Entry]] = {}
    for entry in _usable(entries, rejected):
        folder, name = posixpath.split(entry.name)
        stem, _, ext = name.partition(".")
        groups.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = entry
    images, labels = [], []
    for key, members in sorted(groups.items()):
        found = [ext for ext in WEBDATASET_IMAGES if ext in members]
        if not found:
            rejected.append({"path": key, "reason": f"no image member (only {', '.join(sorted(members))})"})
            continue
        label = UNLABELED
        if "cls" in members:
            try:
                label = int(read_entry(members["cls"]).decode().strip())
            except (OSError, ValueError) as err:
                rejected.append({"path": key, "reason": f"unreadable .cls ({err})"})
                continue
        labels.append(label)
        side = tuple((ext, members[ext]) for ext in WEBDATASET_TEXT if ext in members)
        images.append(SourceImage(members[found[0]], key, str(label) if label != UNLABELED else "", label, side,
                                  key=posixpath.basename(key)))
    labelled = [label for label in labels if label != UNLABELED]
    if labelled and len(labelled) != len(labels):
        raise BuildError(f"{len(labelled)} of {len(labels)} samples have a .cls: a split is labelled or not")
    classes = [str(i) for i in range(max(labelled) + 1)] if labelled else []
    return classes, images


def flat_val_images(listing: Listing, labels_file: Path | None, synsets: Path | None,
                    classes: list[str] | None, rejected: list[dict]) -> tuple[list[str], list[SourceImage]]:
    """Images in one folder, labelled by file stem from `labels_file` (or from the archive's own Kaggle CSV)."""
    files = _usable(listing.entries, rejected)
    if labels_file:
        wnid_of = read_val_labels(labels_file, synsets)
    elif listing.val_labels is not None:
        wnid_of = _parse_val_labels(KAGGLE_VAL_LABELS, read_entry(listing.val_labels).decode(), None)
    else:
        raise BuildError("a flat val split needs --val-labels (Kaggle CSV, devkit ground truth or the devkit .tar.gz)")
    classes = classes or sorted(set(wnid_of.values()))
    label = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(wnid_of.values()) - set(classes))
    if unknown:
        raise BuildError(f"{labels_file}: wnid {unknown[0]} is not one of the {len(classes)} known classes")
    images = []
    for entry in files:
        name = basename(entry.name)
        wnid = wnid_of.get(name.split(".")[0])
        if wnid is None:
            source = labels_file.name if labels_file else KAGGLE_VAL_LABELS
            rejected.append({"path": name, "reason": f"no label in {source}"})
            continue
        images.append(SourceImage(entry, name, wnid, label[wnid]))
    return classes, sorted(images, key=lambda image: image.rel)


def read_val_labels(labels: Path, synsets: Path | None) -> dict[str, str]:
    """Image stem -> wnid, from the Kaggle CSV, the devkit's ground-truth file, or the devkit's .tar.gz."""
    if not labels.is_file():
        raise BuildError(f"--val-labels {labels}: no such file")
    if labels.name.endswith((".tar.gz", ".tgz")):
        return _devkit_labels(labels, synsets)
    return _parse_val_labels(labels.name, labels.read_text(), lambda: _ilsvrc_id_to_wnid(synsets))


def _parse_val_labels(name: str, text: str, id_to_wnid: Callable[[], dict[int, str]] | None) -> dict[str, str]:
    """Stem -> wnid from a Kaggle CSV, or from devkit ground truth (ILSVRC ids, mapped by `id_to_wnid`)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].lower().startswith("imageid"):
        out = {}
        for row in lines[1:]:
            image_id, _, prediction = row.partition(",")
            out[image_id] = prediction.split()[0]
        return out
    if lines and all(line.isdigit() for line in lines) and id_to_wnid is not None:
        mapping = id_to_wnid()
        bad = [x for x in lines if int(x) not in mapping]
        if bad:
            raise BuildError(f"{name}: class id {bad[0]} is not in the synsets")
        return {f"ILSVRC2012_val_{i + 1:08d}": mapping[int(x)] for i, x in enumerate(lines)}
    raise BuildError(f"{name}: neither a Kaggle CSV (ImageId,PredictionString) nor a devkit ground-truth file")


def _devkit_labels(devkit: Path, synsets: Path | None) -> dict[str, str]:
    """The ground truth and meta.mat read from inside ILSVRC2012_devkit_t12.tar.gz (small: one pass)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(devkit, "r:gz") as tar:
            for info in tar:
                for wanted in (DEVKIT_GROUND_TRUTH, DEVKIT_META):
                    if info.isfile() and info.name.endswith(wanted):
                        found[wanted] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise BuildError(f"--val-labels {devkit}: not a readable devkit archive ({err})") from None
    if DEVKIT_GROUND_TRUTH not in found:
        raise BuildError(f"--val-labels {devkit}: no {DEVKIT_GROUND_TRUTH} inside")

    def id_to_wnid() -> dict[int, str]:
        if synsets is not None:
            return _ilsvrc_id_to_wnid(synsets)
        if DEVKIT_META not in found:
            raise BuildError(f"{devkit}: no {DEVKIT_META} inside: pass --synsets")
        return _meta_mat_wnids(found[DEVKIT_META])

    return _parse_val_labels(devkit.name, found[DEVKIT_GROUND_TRUTH].decode(), id_to_wnid)


def _ilsvrc_id_to_wnid(synsets: Path | None) -> dict[int, str]:
    if synsets is None:
        raise BuildError("a devkit ground-truth file needs --synsets: the devkit's meta.mat, or a text file of "
                         "'<ILSVRC2012_ID> <wnid>' lines")
    if synsets.suffix == ".mat":
        return _meta_mat_wnids(synsets)
    return _id_wnid_lines(synsets)


def _id_wnid_lines(synsets: Path) -> dict[int, str]:
    """A synsets text file that names each id: '<ILSVRC2012_ID> <wnid>' lines. A bare list of wnids is refused:
    its order is not the ids' (the usual synsets.txt and LOC_synset_mapping.txt are sorted by wnid, which
    labels every val image wrongly)."""
    mapping: dict[int, str] = {}
    for number, line in enumerate(synsets.read_text().splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if len(words) < 2 or not words[0].isdigit():
            raise BuildError(f"--synsets {synsets}, line {number}: expected '<ILSVRC2012_ID> <wnid>', got {line!r} "
                             "(a bare wnid list is not in id order: pass the devkit's meta.mat, or its .tar.gz as "
                             "--val-labels)")
        if int(words[0]) in mapping:
            raise BuildError(f"--synsets {synsets}, line {number}: id {words[0]} is given twice")
        mapping[int(words[0])] = words[1]
    return mapping


def _meta_mat_wnids(source: Path | bytes) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's meta.mat (its `synsets` struct array)."""
    try:
        rows = read_mat(source)["synsets"]
        return {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in rows}
    except (MatFileError, KeyError, TypeError, struct.error, zlib.error) as err:
        raise BuildError(f"{source if isinstance(source, Path) else DEVKIT_META}: not the devkit's meta.mat "
                         f"(a struct array 'synsets' with ILSVRC2012_ID and WNID): {err}") from None
