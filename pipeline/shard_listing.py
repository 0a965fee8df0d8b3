"""What a shard build reads, wherever it lies: the input listed as a stream of entries (see
`pipeline.archives` for reading inside archives), and which of them are images.

Inputs: a folder at any depth, or a tar, .tar.gz or zip (its member paths as a folder's); a folder
of per-class tars (ImageNet-21k as distributed) or a tar of them (ImageNet-1k's train tar); the
Kaggle ImageNet zip, narrowed to its split's folder, its labels file found inside. Hidden files and
archive clutter are left out, as a folder listing leaves them; what is listed but unreadable is
reported, and the images among the rest are found by name or by their first bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.archives import (
    ArchiveError,
    Entry,
    basename,
    folder_entries,
    is_archive,
    read_entry,
    tar_archive_entries,
    tar_entries,
    zip_entries,
)
from pipeline.errors import BuildError
from pipeline.imagenet_labels import KAGGLE_VAL_LABELS
from pipeline.shard_reports import Reports

KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC/"
IGNORED_FOLDERS = ("__MACOSX",)  # macOS archive clutter
IMAGE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".tga",
    ".ico",
)
IMAGE_SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG",
    b"GIF8",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"P4",
    b"P5",
    b"P6",
)


@dataclass
class Listing:
    """The input's files as a stream of entries, and a labels file found beside them."""

    entries: Iterator[Entry]
    val_labels: Entry | None = None  # the Kaggle zip's LOC_val_solution.csv
    flat: bool = False  # a zip whose files all lie at its top (or at its Kaggle split's top)


def source_entries(
    src: Path, split: str, scratch: Path, problems: Reports, any_depth: bool = False
) -> Listing:
    """List SRC, streamed; the problems met listing it go to `problems` as they are met. A
    Kaggle-layout zip is narrowed to `split`'s folder; a folder holding only tars is a folder of
    per-class tars (ImageNet-21k as distributed)."""
    if src.is_dir():
        tars = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(".tar"))
        if tars and not any(p.is_dir() and not p.name.startswith(".") for p in src.iterdir()):
            return Listing(_per_class_tars(tars, problems))
        return Listing(folder_entries(src, None if any_depth else 2))
    if not is_archive(src):
        raise BuildError(f"SRC {src} is not a folder, a tar, a .tar.gz or a zip")
    try:
        if src.name.lower().endswith(".zip"):
            return _zip_listing(src, split, problems)
        return Listing(tar_archive_entries(src, scratch, problems))
    except ArchiveError as err:
        raise BuildError(str(err)) from None


def _zip_listing(src: Path, split: str, problems: Reports) -> Listing:
    """A zip's central directory is in memory whole, so the Kaggle layout and its labels file are
    seen at once."""
    entries = zip_entries(src, problems)
    labels = next(
        (e for e in entries if basename(e.name) == KAGGLE_VAL_LABELS and not e.problem), None
    )
    kaggle = KAGGLE_ROOT + split + "/"
    if any(e.name.startswith(kaggle) for e in entries):
        entries = [
            Entry(**{**e.__dict__, "name": e.name[len(kaggle) :]})
            for e in entries
            if e.name.startswith(kaggle)
        ]
    flat = not any("/" in e.name for e in entries if not e.problem)
    return Listing(iter(entries), labels, flat)


def _per_class_tars(tars: list[Path], problems: Reports) -> Iterator[Entry]:
    for tar in tars:
        prefix = tar.name[:-4] + "/"
        yield Entry(prefix, str(tar), 0, problem="a folder")
        try:
            yield from tar_entries(tar, tar.name, problems, prefix=prefix)
        except ArchiveError as err:
            problems.append({"path": tar.name, "reason": str(err)})


def usable(entry: Entry, rejected: Reports) -> bool:
    """A file entry that can be read, not hidden; one with a problem is reported in `rejected`."""
    if entry.problem == "a folder":
        return False
    if entry.problem:
        rejected.append({"path": entry.name, "reason": entry.problem})
        return False
    # hidden files and archive clutter, as a folder listing leaves them out
    return not any(p.startswith(".") or p in IGNORED_FOLDERS for p in entry.name.split("/"))


def images_only(images: list[Any], rejected: Reports) -> list[Any]:
    """The listed files that are images by their name or by their first bytes; the others (a
    Thumbs.db, a README) reported in `rejected` here, so that they never take a place in the
    shuffle: the shards follow the images alone, whatever else lies beside them. (The writers decode
    and check every image that stays.)"""
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
