"""What a shard build reads: the images of a class-folder tree, or of a flat val folder with its labels.

Class folders are WordNet ids (or any names); a label is the class's index in the sorted class list,
or in a list reused from the train manifest (`--classes`) so val labels match train's. A flat val
folder takes its labels from the Kaggle CSV (`LOC_val_solution.csv`) or the devkit's ground truth
(ILSVRC ids, mapped to wnids through meta.mat or a synsets text file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class BuildError(Exception):
    """A problem with the command's inputs or OUT: reported in one line, nothing written."""


@dataclass(frozen=True)
class SourceImage:
    path: str
    rel: str
    class_name: str
    label: int
    size: int


def _is_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".")


def read_class_list(path: Path) -> list[str]:
    """Classes from a manifest (`train.json`) or a text file with one class name first on each line."""
    if not path.is_file():
        raise BuildError(f"--classes {path}: no such file")
    if path.suffix == ".json":
        return list(json.loads(path.read_text())["classes"])
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def list_class_tree(src: Path, classes: list[str] | None) -> tuple[list[str], list[SourceImage]]:
    folders = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise BuildError(f"{src}: no class folders found (expected SRC/<class>/<image>, or pass --val-labels)")
    classes = classes or folders
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise BuildError(f"{src}: class folder {unknown[0]} is not in the class list given by --classes")
    label = {name: i for i, name in enumerate(classes)}
    images = [
        SourceImage(str(f), f"{folder}/{f.name}", folder, label[folder], f.stat().st_size)
        for folder in folders
        for f in sorted((src / folder).iterdir())
        if _is_candidate(f)
    ]
    return classes, images


def _ilsvrc_id_to_wnid(synsets: Path | None) -> dict[int, str]:
    if synsets is None:
        raise BuildError("a devkit ground-truth file needs --synsets (meta.mat, or a text file: line k = wnid of id k)")
    if synsets.suffix == ".mat":
        try:
            from scipy.io import loadmat  # optional: only the devkit's meta.mat needs it
        except ImportError:
            raise BuildError("reading meta.mat needs scipy (pip install scipy), or pass a synsets text file") from None
        rows = loadmat(str(synsets), squeeze_me=True)["synsets"]
        return {int(r["ILSVRC2012_ID"]): str(r["WNID"]) for r in rows}
    lines = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
    return {i + 1: wnid for i, wnid in enumerate(lines)}


def read_val_labels(labels: Path, synsets: Path | None) -> dict[str, str]:
    """Image stem -> wnid, from the Kaggle CSV or the devkit's ground-truth file."""
    if not labels.is_file():
        raise BuildError(f"--val-labels {labels}: no such file")
    lines = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
    if lines and lines[0].lower().startswith("imageid"):
        out = {}
        for row in lines[1:]:
            image_id, _, prediction = row.partition(",")
            out[image_id] = prediction.split()[0]
        return out
    if lines and all(line.isdigit() for line in lines):
        id_to_wnid = _ilsvrc_id_to_wnid(synsets)
        bad = [x for x in lines if int(x) not in id_to_wnid]
        if bad:
            raise BuildError(f"{labels}: class id {bad[0]} is not in {synsets}")
        return {f"ILSVRC2012_val_{i + 1:08d}": id_to_wnid[int(x)] for i, x in enumerate(lines)}
    raise BuildError(f"{labels}: neither a Kaggle CSV (ImageId,PredictionString) nor a devkit ground-truth file")


def list_flat_val(
    src: Path, labels_file: Path, synsets: Path | None, classes: list[str] | None
) -> tuple[list[str], list[SourceImage], list[dict]]:
    wnid_of = read_val_labels(labels_file, synsets)
    classes = classes or sorted(set(wnid_of.values()))
    label = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(wnid_of.values()) - set(classes))
    if unknown:
        raise BuildError(f"{labels_file}: wnid {unknown[0]} is not one of the {len(classes)} known classes")
    images, unlabeled = [], []
    for f in sorted(src.iterdir()):
        if not _is_candidate(f):
            continue
        wnid = wnid_of.get(f.name.split(".")[0])
        if wnid is None:
            unlabeled.append({"path": f.name, "reason": f"no label in {labels_file.name}"})
            continue
        images.append(SourceImage(str(f), f.name, wnid, label[wnid], f.stat().st_size))
    return classes, images, unlabeled
