"""Which label each image of a shard build gets, by input mode, and the one table of those modes
that both the command line and the builder read (`INPUT_MODES`).

A label is the class's index in the sorted class list (empty classes included, so a class with no
images shifts nothing), or in a list reused from the train manifest (`--classes`) so val labels
match train's. The same images give the same list, in the same order, with the same names, whichever
container holds them; so they give the same shards.
"""

from __future__ import annotations

import json
import posixpath
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.archives import Entry, basename, read_entry
from pipeline.errors import BuildError
from pipeline.imagenet_labels import KAGGLE_VAL_LABELS, parse_val_labels, read_val_labels
from pipeline.shard_listing import IGNORED_FOLDERS, Listing, source_entries, usable
from pipeline.shard_reports import Reports

UNLABELED = -1


@dataclass(frozen=True)
class SourceImage:
    entry: Entry
    """where its bytes are"""
    rel: str
    """its name in the data set (`<class>/<file>`, or its path for unlabeled data), kept in the
    sample's json"""
    class_name: str
    label: int
    """index in the class list, or UNLABELED"""
    side: tuple[tuple[str, Entry], ...] = ()
    """a repacked WebDataset sample's other members (ext, entry): their text goes into the sample's
    json"""
    key: str = ""
    """a repacked WebDataset sample's original key, kept in the sample's json"""

    @property
    def size(self) -> int:
        return self.entry.size

    def read(self) -> bytes:
        return read_entry(self.entry)

    def row(self) -> list:
        """The image as a JSON row, for the builder's scratch files."""
        return [
            self.entry.row(),
            self.rel,
            self.class_name,
            self.label,
            [[ext, e.row()] for ext, e in self.side],
            self.key,
        ]

    @classmethod
    def from_row(cls, row: list) -> SourceImage:
        entry, rel, class_name, label, side, key = row
        return cls(
            Entry.from_row(entry),
            rel,
            class_name,
            label,
            tuple((ext, Entry.from_row(e)) for ext, e in side),
            key,
        )


def read_class_list(path: Path) -> list[str]:
    """Classes from a manifest (`train.json`) or a text file with one class name first on each
    line."""
    if not path.is_file():
        raise BuildError(f"--classes {path}: no such file")
    if path.suffix == ".json":
        return list(json.loads(path.read_text())["classes"])
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Candidate:
    name: str
    """the image's name in the data set (`SourceImage.rel`), which places it in the shuffle"""
    entry: Entry
    label: int = UNLABELED
    """a label the listing itself gives (a file list's); others come from `Labelling.label`"""


@dataclass
class LabelCounts:
    """What the class list may need to know of the labels of all images: how many, how many
    labelled, the top."""

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


class Labelling(ABC):
    """How one input mode labels its images. The builder reads the listing in two passes, so that no
    pass holds every image (`pipeline.shard_order`):

    1. `candidates()` streams what may be an image, named as it will be in the data set (the name
    that places it in
       the shuffle), keeping only small facts about the whole (class folders, depths, label counts);
    2. `settle()` decides from those facts what needs the whole listing (the class list), or raises
    BuildError;
    3. `label(group, rejected)` makes the images of one group of candidates, a group holding every
    candidate of any
       name it holds; groups are labelled in worker processes, which receive the labelling without
       its listing and its parent's report of rejections (`label` is given its own);
    4. `classes(labels)` is the final class list, given the label counts of every image made.
    """

    listing: Listing | Path
    rejected: Reports

    @abstractmethod
    def candidates(self) -> Iterator[Candidate]:
        """What may be an image, streamed (step 1)."""

    def settle(self) -> None:  # noqa: B027 - a mode that needs the whole listing overrides it
        """Step 2: decide what needs the whole listing; raise BuildError where it cannot be
        labelled."""

    @abstractmethod
    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        """The images of `group` with their labels (step 3); what cannot be labelled goes to
        `rejected`."""

    def classes(self, labels: LabelCounts) -> list[str]:
        """Step 4. Here: integer labels read as given (a file list's, a .cls), the class list
        0..max."""
        return [str(i) for i in range(labels.top + 1)]

    def __getstate__(self) -> dict:
        return {
            key: value for key, value in vars(self).items() if key not in ("listing", "rejected")
        }


class ClassFolders(Labelling):
    """Images named `.../<class>/<file>`: the class is the folder holding the file, at the depth
    most files lie."""

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
            if not usable(entry, self.rejected):
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
            raise BuildError(
                "no class folders found (expected SRC/<class>/<image>, or pass --val-labels or "
                "--unlabeled)"
            )
        self.depth = max(depths, key=lambda d: self.files_at[d])
        found = sorted(self.folders_at[self.depth - 1] | self.parents_at[self.depth])
        self.class_list = self.given or found
        unknown = sorted(set(found) - set(self.class_list))
        if unknown:
            raise BuildError(
                f"class folder {unknown[0]} is not in the class list given by --classes"
            )
        self.label_of = {name: i for i, name in enumerate(self.class_list)}

    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        images = []
        for candidate in group:
            entry = candidate.entry
            if entry.name.count("/") != self.depth:
                where = (
                    "outside any class folder"
                    if "/" not in entry.name
                    else "not at the class folders' depth"
                )
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
        return (Candidate(e.name, e) for e in self.listing.entries if usable(e, self.rejected))

    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        return [SourceImage(c.entry, c.name, "", UNLABELED) for c in group]


class FileList(Labelling):
    """`path [label]` per line (paths relative to the list's folder). Integer labels are kept as
    given (the class list is then 0..max); without labels the images are unlabeled."""

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
                path, label = (
                    (line.strip().rsplit(None, 1)[0], int(parts[-1]))
                    if labelled_line
                    else (line.strip(), UNLABELED)
                )
                file = Path(path) if Path(path).is_absolute() else self.listing.parent / path
                if not file.is_file():
                    self.rejected.append(
                        {
                            "path": path,
                            "reason": f"line {number} of {self.listing.name}: no such file",
                        }
                    )
                    continue
                self.lines += 1
                self.labelled += labelled_line
                yield Candidate(path, Entry(path, str(file), file.stat().st_size), label)

    def settle(self) -> None:
        if self.labelled and self.labelled != self.lines:
            raise BuildError(
                f"{self.listing}: {self.labelled} of {self.lines} lines have a label: give every "
                "line one, or none"
            )

    def label(self, group: list[Candidate], rejected: Reports) -> list[SourceImage]:
        return [
            SourceImage(c.entry, c.name, str(c.label) if self.labelled else "", c.label)
            for c in group
        ]


WEBDATASET_IMAGES = ("jpg", "jpeg", "png", "webp")
WEBDATASET_TEXT = ("txt", "json")


class WebDatasetSamples(Labelling):
    """Samples of existing WebDataset tars (img2dataset's: an image with .txt/.json beside it, maybe
    a .cls): a sample is the members sharing a key (the path up to the first dot of the name). Their
    `.cls` integers are the labels (the class list is then 0..max); without them the samples are
    unlabeled."""

    def __init__(self, listing: Listing, rejected: Reports) -> None:
        self.listing, self.rejected = listing, rejected

    def candidates(self) -> Iterator[Candidate]:
        for entry in self.listing.entries:
            if usable(entry, self.rejected):
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
                rejected.append(
                    {"path": key, "reason": f"no image member (only {', '.join(sorted(members))})"}
                )
                continue
            label = UNLABELED
            if "cls" in members:
                try:
                    label = int(read_entry(members["cls"]).decode().strip())
                except (OSError, ValueError) as err:
                    rejected.append({"path": key, "reason": f"unreadable .cls ({err})"})
                    continue
            side = tuple((ext, members[ext]) for ext in WEBDATASET_TEXT if ext in members)
            images.append(
                SourceImage(
                    members[found[0]],
                    key,
                    str(label) if label != UNLABELED else "",
                    label,
                    side,
                    key=posixpath.basename(key),
                )
            )
        return images

    def classes(self, labels: LabelCounts) -> list[str]:
        if labels.labelled and labels.labelled != labels.images:
            raise BuildError(
                f"{labels.labelled} of {labels.images} samples have a .cls: a split is labelled or "
                "not"
            )
        return super().classes(labels)


class FlatVal(Labelling):
    """Images in one folder, labelled by file stem from `labels_file` (or from the archive's own
    Kaggle CSV)."""

    def __init__(self, listing: Listing, labels_file: Path | None, synsets: Path | None,
                 given: list[str] | None, rejected: Reports) -> None:
        if labels_file:
            self.wnid_of = read_val_labels(labels_file, synsets)
        elif listing.val_labels is not None:
            self.wnid_of = parse_val_labels(
                KAGGLE_VAL_LABELS, read_entry(listing.val_labels).decode(), None
            )
        else:
            raise BuildError(
                "a flat val split needs --val-labels (Kaggle CSV, devkit ground truth or the "
                "devkit .tar.gz)"
            )
        self.class_list = given or sorted(set(self.wnid_of.values()))
        unknown = sorted(set(self.wnid_of.values()) - set(self.class_list))
        if unknown:
            raise BuildError(
                f"{labels_file}: wnid {unknown[0]} is not one of the {len(self.class_list)} known "
                "classes"
            )
        self.label_of = {name: i for i, name in enumerate(self.class_list)}
        self.source = labels_file.name if labels_file else KAGGLE_VAL_LABELS
        self.listing, self.rejected = listing, rejected

    def candidates(self) -> Iterator[Candidate]:
        return (
            Candidate(basename(e.name), e) for e in self.listing.entries if usable(e, self.rejected)
        )

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



# ---------------------------------------------------------------- the input modes


@dataclass(frozen=True)
class ModeInput:
    """What a mode's labelling is made from: the build's input and its labelling options."""

    src: Path
    split: str
    scratch: Path
    """where the listing may spill (a .tar.gz's tar)"""
    rejected: Reports
    classes: list[str] | None
    """the class list to label with (`--classes`), or None: the one the input gives"""
    val_labels: Path | None
    synsets: Path | None

    def listing(self, any_depth: bool = False) -> Listing:
        return source_entries(self.src, self.split, self.scratch, self.rejected, any_depth)


@dataclass(frozen=True)
class InputMode:
    """One way of reading the input, as the command line offers it (`flag`, with a `value` to give
    or as a switch) and as the builder makes its labelling (`make`)."""

    name: str
    help: str
    value: str | None
    """the flag's value's name (`--val-labels FILE`), or None: a switch"""
    make: Callable[[ModeInput], Labelling]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _class_folders(given: ModeInput) -> Labelling:
    """The default mode: class folders, or a flat val split where the archive holds its own labels
    (Kaggle's)."""
    listing = given.listing()
    if listing.val_labels is not None and listing.flat:
        return FlatVal(listing, None, given.synsets, given.classes, given.rejected)
    return ClassFolders(listing, given.classes, given.rejected)


CLASS_FOLDERS = InputMode(
    "class_folders", "SRC/<class>/<image> (the default)", None, _class_folders
)
INPUT_MODES = (
    InputMode(
        "val_labels",
        "labels for a flat val folder: Kaggle CSV, devkit ground truth, or the devkit .tar.gz "
        "itself",
        "FILE",
        lambda given: FlatVal(
            given.listing(), given.val_labels, given.synsets, given.classes, given.rejected
        ),
    ),
    InputMode(
        "unlabeled",
        "every image under SRC at any depth, no labels (MAE pre-training needs none)",
        None,
        lambda given: Unlabeled(given.listing(any_depth=True), given.rejected),
    ),
    InputMode(
        "file_list",
        "SRC is a text file: one image path per line (relative to the file), optionally "
        "followed by an integer label",
        None,
        lambda given: FileList(given.src, given.rejected),
    ),
    InputMode(
        "webdataset",
        "SRC is existing WebDataset tars (a tar or a folder of them, e.g. img2dataset's): "
        "repacked, keeping each sample's key and .txt/.json",
        None,
        lambda given: WebDatasetSamples(given.listing(), given.rejected),
    ),
)
