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
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
from pipeline.matfile import MatFileError, read_mat
from pipeline.shard_reports import Reports

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

    def row(self) -> list:
        """The image as a JSON row, for the builder's scratch files."""
        return [self.entry.row(), self.rel, self.class_name, self.label, [[ext, e.row()] for ext, e in self.side],
                self.key]

    @classmethod
    def from_row(cls, row: list) -> SourceImage:
        entry, rel, class_name, label, side, key = row
        return cls(Entry.from_row(entry), rel, class_name, label, tuple((ext, Entry.from_row(e)) for ext, e in side),
                   key)


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
    """The input's files as a stream of entries, and a labels file found beside them."""

    entries: Iterator[Entry]
    val_labels: Entry | None = None  # the Kaggle zip's LOC_val_solution.csv
    flat: bool = False  # a zip whose files all lie at its top (or at its Kaggle split's top)


def source_entries(src: Path, split: str, scratch: Path, problems: Reports, any_depth: bool = False) -> Listing:
    """List SRC, streamed; the problems met listing it go to `problems` as they are met. A Kaggle-layout zip is
    narrowed to `split`'s folder; a folder holding only tars is a folder of per-class tars (ImageNet-21k as
    distributed)."""
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
    """A zip's central directory is in memory whole, so the Kaggle layout and its labels file are seen at once."""
    entries = zip_entries(src, problems)
    labels = next((e for e in entries if basename(e.name) == KAGGLE_VAL_LABELS and not e.problem), None)
    kaggle = KAGGLE_ROOT + split + "/"
    if any(e.name.startswith(kaggle) for e in entries):
        entries = [Entry(**{**e.__dict__, "name": e.name[len(kaggle):]}) for e in entries if e.name.startswith(kaggle)]
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


def _usable(entry: Entry, rejected: Reports) -> bool:
    """A file entry that can be read, not hidden; one with a problem is reported in `rejected`."""
    if entry.problem == "a folder":
        return False
    if entry.problem:
        rejected.append({"path": entry.name, "reason": entry.problem})
        return False
    # hidden files and archive clutter, as a folder listing leaves them out
    return not any(p.startswith(".") or p in IGNORED_FOLDERS for p in entry.name.split("/"))


def images_only(images: list[SourceImage], rejected: Reports) -> list[SourceImage]:
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
#
# A labelling reads the listing in two passes, so that no pass holds every image (see `shard_order`):
# - `candidates()` streams what may be an image, named as it will be in the data set (the name that places it in
#   the shuffle), and keeps only small facts about the whole (class folders, depths, label counts);
# - `settle()` decides from those facts what needs the whole listing (the class list);
# - `label(group, rejected)` makes the images of one group of candidates, which holds every candidate of any name
#   it holds; groups are labelled in worker processes, which receive the labelling without its listing;
# - `classes(labels)` is the final class list, given the labels of every image made.


@dataclass(frozen=True)
class Candidate:
    name: str
    """the image's name in the data set (`SourceImage.rel`), which places it in the shuffle"""
    entry: Entry
    label: int = UNLABELED
    """a label the listing itself gives (a file list's); others come from `Labelling.label`"""


@dataclass
class LabelCounts:
    """What the class list may need to know of the labels of all images: how many, how many labelled, the top."""

    images: int = 0
    labelled: int = 0
    top: int = UNLABELED

    def add(self, images: list[SourceImage]) -> None:
        labels = [image.label for image in images if image.label != UNLABELED]
        self.images += len(images)
        self.labelled += len(labels)
        self.top = max([self.top, *labels])

    def merge(self, other: LabelCounts) -> None:
        self.images += other.images
        self.labelled += other.labelled
        self.top = max(self.top, other.top)


class Labelling:
    """The modes' common part: what a worker process receives of a labelling is all but its listing and the
    parent's report of rejections (`label` is given its own)."""

    listing: Listing | Path
    rejected: Reports

    def candidates(self) -> Iterator[Candidate]:
        raise NotImplementedError

    def settle(self) -> None:
        """Decide what needs the whole listing; raises BuildError where it cannot be labelled."""

    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        raise NotImplementedError

    def classes(self, labels: LabelCounts) -> list[str]:
        """Integer labels read as given (a file list's, a .cls): the class list is 0..max."""
        return [str(i) for i in range(labels.top + 1)]

    def __getstate__(self) -> dict:
        return {key: value for key, value in vars(self).items() if key not in ("listing", "rejected")}


class ClassFolders(Labelling):
    """Images named `.../<class>/<file>`: the class is the folder holding the file, at the depth most files lie."""

    def __init__(self, listing: Listing, given: list[str] | None, rejected: Reports) -> None:
        self.listing, self.given, self.rejected = listing, given, rejected
        self.files_at: Counter[int] = Counter()
        self.folders_at: dict[int, set[str]] = defaultdict(set)
        self.parents_at: dict[int, set[str]] = defaultdict(set)
        self.saw_folder = False
        self.depth = 0
        self.class_list: list[str] = []

    def candidates(self) -> Iterator[Candidate]:
        for entry in self.listing.entries:
            if entry.problem == "a folder":
                self.saw_folder = True
                name = basename(entry.name)
                if not name.startswith(".") and name not in IGNORED_FOLDERS:
                    self.folders_at[entry.name.rstrip("/").count("/")].add(name)
            if not _usable(entry, self.rejected):
                continue
            depth = entry.name.count("/")
            self.files_at[depth] += 1
            folder, _, file = entry.name.rpartition("/")
            cls = folder.rpartition("/")[2]
            if depth:
                self.parents_at[depth].add(cls)
            yield Candidate(f"{cls}/{file}", entry)

    def settle(self) -> None:
        depths = sorted(set(self.files_at) - {0})
        if not depths:
            if self.saw_folder:
                raise BuildError("no image files found")
            raise BuildError("no class folders found (expected SRC/<class>/<image>, or pass --val-labels or "
                             "--unlabeled)")
        self.depth = max(depths, key=lambda d: self.files_at[d])
        found = sorted(self.folders_at[self.depth - 1] | self.parents_at[self.depth])
        self.class_list = self.given or found
        unknown = sorted(set(found) - set(self.class_list))
        if unknown:
            raise BuildError(f"class folder {unknown[0]} is not in the class list given by --classes")
        self.label_of = {name: i for i, name in enumerate(self.class_list)}

    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        images = []
        for candidate in group:
            entry = candidate.entry
            if entry.name.count("/") != self.depth:
                where = "outside any class folder" if "/" not in entry.name else "not at the class folders' depth"
                rejected.append({"path": entry.name, "reason": f"{where}: skipped"})
                continue
            cls = candidate.name.partition("/")[0]
            images.append(SourceImage(entry, candidate.name, cls, self.label_of[cls]))
        return images

    def classes(self, labels: LabelCounts) -> list[str]:
        return self.class_list


class Unlabeled(Labelling):
    """Every image, named by its path, with no label (MAE pre-training needs none)."""

    def __init__(self, listing: Listing, rejected: Reports) -> None:
        self.listing, self.rejected = listing, rejected

    def candidates(self) -> Iterator[Candidate]:
        return (Candidate(e.name, e) for e in self.listing.entries if _usable(e, self.rejected))

    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        return [SourceImage(c.entry, c.name, "", UNLABELED) for c in group]


class FileList(Labelling):
    """`path [label]` per line (paths relative to the list's folder). Integer labels are kept as given (the class
    list is then 0..max); without labels the images are unlabeled."""

    def __init__(self, listing: Path, rejected: Reports) -> None:
        if not listing.is_file():
            raise BuildError(f"--file-list {listing}: no such file")
        self.listing, self.rejected = listing, rejected
        self.lines = self.labelled = 0

    def candidates(self) -> Iterator[Candidate]:
        with open(self.listing) as lines:
            for number, line in enumerate(lines, start=1):
                parts = line.split()
                if not parts or parts[0].startswith("#"):
                    continue
                labelled_line = len(parts) > 1 and parts[-1].isdigit()
                path, label = (line.strip().rsplit(None, 1)[0], int(parts[-1])) if labelled_line else \
                    (line.strip(), UNLABELED)
                file = Path(path) if Path(path).is_absolute() else self.listing.parent / path
                if not file.is_file():
                    self.rejected.append({"path": path, "reason": f"line {number} of {self.listing.name}: no such "
                                                                  "file"})
                    continue
                self.lines += 1
                self.labelled += labelled_line
                yield Candidate(path, Entry(path, str(file), file.stat().st_size), label)

    def settle(self) -> None:
        if self.labelled and self.labelled != self.lines:
            raise BuildError(f"{self.listing}: {self.labelled} of {self.lines} lines have a label: give every line "
                             "one, or none")

    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        return [SourceImage(c.entry, c.name, str(c.label) if self.labelled else "", c.label) for c in group]


WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp")
WEBDATASET_TEXT = ("txt", "json")


class WebDatasetSamples(Labelling):
    """Samples of existing WebDataset tars (img2dataset's: an image with .txt/.json beside it, maybe a .cls): a
    sample is the members sharing a key (the path up to the first dot of the name). Their `.cls` integers are the
    labels (the class list is then 0..max); without them the samples are unlabeled."""

    def __init__(self, listing: Listing, rejected: Reports) -> None:
        self.listing, self.rejected = listing, rejected

    def candidates(self) -> Iterator[Candidate]:
        for entry in self.listing.entries:
            if _usable(entry, self.rejected):
                folder, name = posixpath.split(entry.name)
                yield Candidate(posixpath.join(folder, name.partition(".")[0]), entry)

    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        samples: dict[str, dict[str, Entry]] = {}
        for candidate in group:
            ext = basename(candidate.entry.name).partition(".")[2]
            samples.setdefault(candidate.name, {})[ext.lower()] = candidate.entry
        images = []
        for key, members in samples.items():
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
            side = tuple((ext, members[ext]) for ext in WEBDATASET_TEXT if ext in members)
            images.append(SourceImage(members[found[0]], key, str(label) if label != UNLABELED else "", label, side,
                                      key=posixpath.basename(key)))
        return images

    def classes(self, labels: LabelCounts) -> list[str]:
        if labels.labelled and labels.labelled != labels.images:
            raise BuildError(f"{labels.labelled} of {labels.images} samples have a .cls: a split is labelled or not")
        return super().classes(labels)


class FlatVal(Labelling):
    """Images in one folder, labelled by file stem from `labels_file` (or from the archive's own Kaggle CSV)."""

    def __init__(self, listing: Listing, labels_file: Path | None, synsets: Path | None,
                 given: list[str] | None, rejected: Reports) -> None:
        if labels_file:
            self.wnid_of = read_val_labels(labels_file, synsets)
        elif listing.val_labels is not None:
            self.wnid_of = _parse_val_labels(KAGGLE_VAL_LABELS, read_entry(listing.val_labels).decode(), None)
        else:
            raise BuildError("a flat val split needs --val-labels (Kaggle CSV, devkit ground truth or the devkit "
                             ".tar.gz)")
        self.class_list = given or sorted(set(self.wnid_of.values()))
        unknown = sorted(set(self.wnid_of.values()) - set(self.class_list))
        if unknown:
            raise BuildError(f"{labels_file}: wnid {unknown[0]} is not one of the {len(self.class_list)} known "
                             "classes")
        self.label_of = {name: i for i, name in enumerate(self.class_list)}
        self.source = labels_file.name if labels_file else KAGGLE_VAL_LABELS
        self.listing, self.rejected = listing, rejected

    def candidates(self) -> Iterator[Candidate]:
        return (Candidate(basename(e.name), e) for e in self.listing.entries if _usable(e, self.rejected))

    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        images = []
        for candidate in group:
            wnid = self.wnid_of.get(candidate.name.split(".")[0])
            if wnid is None:
                rejected.append({"path": candidate.name, "reason": f"no label in {self.source}"})
                continue
            images.append(SourceImage(candidate.entry, candidate.name, wnid, self.label_of[wnid]))
        return images

    def classes(self, labels: LabelCounts) -> list[str]:
        return self.class_list


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
