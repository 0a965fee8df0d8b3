"""The shard manifest `<split>.json` and how loaders find shards from a folder or a brace
pattern."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from braceexpand import braceexpand

from pipeline.errors import DataError
from pipeline.formats import KEY as FORMAT_KEY
from pipeline.formats import check_format, stamp
from pipeline.shard_reports import read_reports
from pipeline.wds_format import index_path, index_sample_count


@dataclass
class ShardRecord:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What `build_shards` wrote for one split."""

    split: str
    samples: int
    classes: list[str]
    shards: list[ShardRecord]
    rejected: int = 0
    """images left out, each with its reason in `<split>.rejected.jsonl` (`Manifest.reports`)"""
    converted: int = 0
    """images re-encoded as RGB JPEG, each with its conversion in `<split>.converted.jsonl`"""
    seed: int = 0
    source: str = ""
    plan: str = ""  # fingerprint of the file listing and settings the shards were cut from

    @staticmethod
    def path(folder: Path, split: str) -> Path:
        return Path(folder) / f"{split}.json"

    @staticmethod
    def report_path(folder: Path, split: str, kind: str) -> Path:
        """A build's per-image reports of one kind (`REPORT_KINDS`), a JSON object a line: kept out
        of the manifest, which every rank reads at start, so that a data set of a billion PNGs costs
        a rank nothing."""
        return Path(folder) / f"{split}.{kind}.jsonl"

    @staticmethod
    def reports(folder: Path, split: str, kind: str) -> Iterator[dict]:
        """The split's reports of one kind, in the order the build met them."""
        return read_reports(Manifest.report_path(folder, split, kind))

    @classmethod
    def load(cls, path: Path) -> Manifest:
        raw = json.loads(Path(path).read_text())
        check_format("manifest", raw, str(path))
        raw.pop(FORMAT_KEY)
        raw["shards"] = [ShardRecord(**s) for s in raw["shards"]]
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(stamp("manifest", asdict(self)), indent=1) + "\n"


@dataclass(frozen=True)
class ShardSet:
    """Tar and index paths of one split, plus its manifest when there is one."""

    tars: list[Path]
    indexes: list[Path]
    manifest: Manifest | None

    def identity(self) -> str:
        """A fingerprint of exactly the data these shards hold, in their order: each shard's digest
        from the manifest and the plan it was cut from (without a manifest: each tar's name and
        size). A reading position is a position in this data and no other: shards rebuilt with
        another seed have the same sizes, not the same identity."""
        if self.manifest is not None:
            digests = {s.name: s.sha256 for s in self.manifest.shards}
            parts = [self.manifest.plan, *(f"{tar.name} {digests[tar.name]}" for tar in self.tars)]
        else:
            parts = [f"{tar.name} {tar.stat().st_size}" for tar in self.tars]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def sample_counts(self) -> list[int]:
        """Samples per shard: the manifest's counts where there is one (each index is checked
        against them when a loader first reads it), else each index file's header line (`v1.2
        <count>`). Looked up once per shard set."""
        return list(self._counts)

    @cached_property
    def _counts(self) -> tuple[int, ...]:
        missing = first_missing(self.indexes)
        if missing is not None:
            raise FileNotFoundError(
                f"index file {missing} is missing; rebuild the shards or run DALI's wds2idx on it"
            )
        if self.manifest is None:
            return tuple(index_sample_count(idx) for idx in self.indexes)
        listed = {s.name: s.samples for s in self.manifest.shards}
        return tuple(listed[tar.name] for tar in self.tars)


def first_missing(paths: list[Path]) -> Path | None:
    """The first of `paths` that is not a file, found by listing each folder once: a hundred
    thousand shards cost a few directory reads, not a hundred thousand file-system lookups (which a
    parallel file system serves slowly)."""
    listed: dict[str, set[str]] = {}
    for path in paths:
        folder, name = os.path.split(os.fspath(path))
        if folder not in listed:
            try:
                listed[folder] = {e.name for e in os.scandir(folder or ".") if e.is_file()}
            except OSError:
                listed[folder] = set()
        if name not in listed[folder]:
            return path
    return None


def resolve_shards(shards: str | Path, split: str = "train") -> ShardSet:
    """A shard folder (read `<split>.json`) or a brace pattern such as
    `out/train-{000000..000009}.tar`."""
    text = str(shards)
    if ("{" in text or text.endswith(".tar")) and not Path(text).is_dir():
        tars = [Path(p) for p in braceexpand(text)]
        missing = first_missing(tars)
        if missing is not None:
            count = sum(not p.is_file() for p in tars)
            raise FileNotFoundError(
                f"shard pattern {text}: {count} file(s) missing, first {missing}"
            )
        manifest_path = Manifest.path(tars[0].parent, split)
        manifest = Manifest.load(manifest_path) if manifest_path.is_file() else None
    else:
        folder = Path(text)
        if not folder.is_dir():
            what = "is a file, not a shard folder" if folder.exists() else "does not exist"
            raise FileNotFoundError(f"shard folder {folder} {what}")
        manifest_path = Manifest.path(folder, split)
        if not manifest_path.is_file():
            # not progress files
            found = sorted(p.name for p in folder.glob("*.json") if not p.name.startswith("."))
            raise FileNotFoundError(
                f"{manifest_path} not found (splits here: "
                f"{', '.join(f[:-5] for f in found) or 'none'}); build shards with `python -m "
                "pipeline.build_shards`"
            )
        manifest = Manifest.load(manifest_path)
        tars = [folder / s.name for s in manifest.shards]
        missing = first_missing(tars)
        if missing is not None:
            count = sum(not p.is_file() for p in tars)
            raise FileNotFoundError(
                f"{manifest_path} lists {count} shard(s) that are missing: {missing}"
            )
    if not tars:
        raise FileNotFoundError(f"no shards for split {split!r} in {text}")
    if manifest is not None:
        listed = {s.name for s in manifest.shards}
        strays = [p.name for p in tars if p.name not in listed]
        if strays:
            raise DataError(
                f"shard {strays[0]} is not in {manifest_path}: the shard list and manifest disagree"
            )
    indexes = [index_path(p) for p in tars]
    return ShardSet(tars, indexes, manifest)


def class_mismatch(first: list[str], second: list[str]) -> str | None:
    """How two class lists differ (labels index them, so any difference changes what a label means),
    or None."""
    if first == second:
        return None
    missing, extra = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    if missing or extra:
        parts = [f"{len(missing)} missing (first {missing[0]})" if missing else "",
                 f"{len(extra)} extra (first {extra[0]})" if extra else ""]
        return f"{len(first)} vs {len(second)} classes: " + ", ".join(p for p in parts if p)
    return "the same classes in another order"


def check_same_classes(shards: str | Path, split: str, other: str) -> None:
    """A ValueError unless `split` and `other` label with one class list (where both have
    manifests), and have one at all: unlabeled shards (built with --unlabeled) serve pre-training,
    not evaluation."""
    lists = [resolve_shards(shards, name).manifest for name in (split, other)]
    if None in lists:
        return
    for name, manifest in zip((split, other), lists, strict=True):
        if not manifest.classes:
            raise DataError(
                f"the {name} shards in {shards} are unlabeled: evaluation needs labelled {split} "
                f"and {other} splits (pre-training does not)"
            )
    mismatch = class_mismatch(lists[0].classes, lists[1].classes)
    if mismatch:
        raise DataError(
            f"the {split} and {other} shards in {shards} label different class lists ({mismatch}): "
            f"label k means another class in each; rebuild {other} with --classes "
            f"{Manifest.path(Path(str(shards)), split)}"
        )
