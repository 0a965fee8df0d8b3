"""ImageNet's own label files, read without their tools: the Kaggle CSV (`LOC_val_solution.csv`),
the devkit's ground truth (ILSVRC ids) mapped to wnids through its `meta.mat` (read by
`pipeline.matfile`, no scipy) or a synsets text file that names each id, and the devkit's .tar.gz
itself, read inside."""

from __future__ import annotations

import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import BuildError
from pipeline.matfile import MatFileError, read_mat

KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"


def read_val_labels(labels: Path, synsets: Path | None) -> dict[str, str]:
    """Image stem -> wnid, from the Kaggle CSV, the devkit's ground-truth file, or the devkit's
    .tar.gz."""
    if not labels.is_file():
        raise BuildError(f"--val-labels {labels}: no such file")
    if labels.name.endswith((".tar.gz", ".tgz")):
        return _devkit_labels(labels, synsets)
    return parse_val_labels(labels.name, labels.read_text(), lambda: _ilsvrc_id_to_wnid(synsets))


def parse_val_labels(
    name: str, text: str, id_to_wnid: Callable[[], dict[int, str]] | None
) -> dict[str, str]:
    """Stem -> wnid from a Kaggle CSV, or from devkit ground truth (ILSVRC ids, mapped by
    `id_to_wnid`)."""
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
    raise BuildError(
        f"{name}: neither a Kaggle CSV (ImageId,PredictionString) nor a devkit ground-truth file"
    )


def _devkit_labels(devkit: Path, synsets: Path | None) -> dict[str, str]:
    """The ground truth and meta.mat read from inside ILSVRC2012_devkit_t12.tar.gz (small: one
    pass)."""
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

    return parse_val_labels(devkit.name, found[DEVKIT_GROUND_TRUTH].decode(), id_to_wnid)


def _ilsvrc_id_to_wnid(synsets: Path | None) -> dict[int, str]:
    if synsets is None:
        raise BuildError(
            "a devkit ground-truth file needs --synsets: the devkit's meta.mat, or a text file of "
            "'<ILSVRC2012_ID> <wnid>' lines"
        )
    if synsets.suffix == ".mat":
        return _meta_mat_wnids(synsets)
    return _id_wnid_lines(synsets)


def _id_wnid_lines(synsets: Path) -> dict[int, str]:
    """A synsets text file that names each id: '<ILSVRC2012_ID> <wnid>' lines. A bare list of wnids
    is refused: its order is not the ids' (the usual synsets.txt and LOC_synset_mapping.txt are
    sorted by wnid, which labels every val image wrongly)."""
    mapping: dict[int, str] = {}
    for number, line in enumerate(synsets.read_text().splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if len(words) < 2 or not words[0].isdigit():
            raise BuildError(
                f"--synsets {synsets}, line {number}: expected '<ILSVRC2012_ID> <wnid>', got "
                f"{line!r} (a bare wnid list is not in id order: pass the devkit's meta.mat, or "
                "its .tar.gz as --val-labels)"
            )
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
        raise BuildError(
            f"{source if isinstance(source, Path) else DEVKIT_META}: not the devkit's meta.mat "
            f"(a struct array 'synsets' with ILSVRC2012_ID and WNID): {err}"
        ) from None
