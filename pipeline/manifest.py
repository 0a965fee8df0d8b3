"""The shard manifest `<split>.json` and how loaders find shards from a folder or a brace
pattern."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from braceexpand import braceexpand

import pipeline.storage as storage
from pipeline.errors import DataError
from pipeline.formats import KEY as FORMAT_KEY
from pipeline.formats import check_format, stamp
from pipeline.shard_reports import read_reports
from pipeline.storage import Location, is_remote, name_of, parent_of
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
    def path(folder: Location, split: str) -> Location:
        return storage.join(folder, f"{split}.json")

    @staticmethod
    def report_path(folder: Location, split: str, kind: str) -> Location:
        """A build's per-image reports of one kind (`REPORT_KINDS`), a JSON object a line: kept out
        of the manifest, which every rank reads at start, so that a data set of a billion PNGs costs
        a rank nothing."""
        return storage.join(folder, f"{split}.{kind}.jsonl")

    @staticmethod
    def reports(folder: Path, split: str, kind: str) -> Iterator[dict]:
        """The split's reports of one kind, in the order the build met them."""
        return read_reports(Manifest.report_path(folder, split, kind))

    @classmethod
    def load(cls, path: Location) -> Manifest:
        raw = json.loads(storage.read_text(path))
        check_format("manifest", raw, str(path))
        raw.pop(FORMAT_KEY)
        raw["shards"] = [ShardRecord(**s) for s in raw["shards"]]
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(stamp("manifest", asdict(self)), indent=1) + "\n"


@dataclass(frozen=True)
class ShardSet:
    """Tar and index locations (paths, or `s3://` URLs) of one split, plus its manifest when there
    is one."""

    tars: list[str]
    indexes: list[str]
    manifest: Manifest | None
    listed: dict[str, int] | None = field(default=None, compare=False, repr=False)
    """size of each of the tars and indexes found where `resolve_shards` listed them (None: list
    again when asked), so that a bucket is listed once per start"""

    def identity(self) -> str:
        """A fingerprint of exactly the data these shards hold, in their order: each shard's digest
        from the manifest and the plan it was cut from (without a manifest: each tar's name and
        size). A reading position is a position in this data and no other: shards rebuilt with
        another seed have the same sizes, not the same identity."""
        if self.manifest is not None:
            digests = {s.name: s.sha256 for s in self.manifest.shards}
            names = [name_of(tar) for tar in self.tars]
            parts = [self.manifest.plan, *(f"{name} {digests[name]}" for name in names)]
        else:
            sizes = self._found(self.tars)
            parts = [f"{name_of(tar)} {sizes[tar]}" for tar in self.tars]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def sample_counts(self) -> list[int]:
        """Samples per shard: the manifest's counts where there is one (each index is checked
        against them when a loader first reads it), else each index file's header line (`v1.2
        <count>`). Looked up once per shard set."""
        return list(self._counts)

    @cached_property
    def _counts(self) -> tuple[int, ...]:
        found = self._found(self.indexes)
        missing = [idx for idx in self.indexes if idx not in found]
        if missing:
            raise FileNotFoundError(
                f"index file {missing[0]} is missing; rebuild the shards or run DALI's wds2idx "
                "on it"
            )
        if self.manifest is None:
            return tuple(index_sample_count(idx) for idx in self.indexes)
        listed = {s.name: s.samples for s in self.manifest.shards}
        return tuple(listed[name_of(tar)] for tar in self.tars)

    def _found(self, files: list[str]) -> dict[str, int]:
        return self.listed if self.listed is not None else _listed(files)


def _listed(files: list[str]) -> dict[str, int]:
    """Size of each of `files` that exists, found by listing each folder once: a hundred thousand
    shards cost a few directory reads (or a bucket's listing pages of a thousand), not a hundred
    thousand lookups, which a parallel file system or an object store serves slowly."""
    sizes: dict[str, int] = {}
    folders: dict[str, dict[str, int]] = {}
    for file in files:
        folder = str(parent_of(file))
        if folder not in folders:
            folders[folder] = storage.listing(folder)
        size = folders[folder].get(name_of(file))
        if size is not None:
            sizes[file] = size
    return sizes


def _is_pattern(text: str) -> bool:
    """A brace pattern or one tar, not a folder (a local folder may end in .tar)."""
    return ("{" in text or text.endswith(".tar")) and (is_remote(text) or not Path(text).is_dir())


def resolve_shards(shards: str | Path, split: str = "train") -> ShardSet:
    """A shard folder (read `<split>.json`) or a brace pattern such as
    `out/train-{000000..000009}.tar`; either may be an `s3://bucket/prefix`. Lists each folder once
    and reads the manifest: what a rank reads from a bucket at start, whatever the data set's
    size."""
    text = str(shards)
    if _is_pattern(text):
        tars = list(braceexpand(text))
        if not is_remote(text):
            tars = [str(Path(t)) for t in tars]
        indexes = [str(index_path(t)) for t in tars]
        found = _listed(tars + indexes)
        missing = [t for t in tars if t not in found]
        if missing:
            raise FileNotFoundError(
                f"shard pattern {text}: {len(missing)} file(s) missing, first {missing[0]}"
            )
        manifest_path = Manifest.path(parent_of(tars[0]), split)
        manifest = Manifest.load(manifest_path) if storage.exists(manifest_path) else None
    else:
        folder = text.rstrip("/") if is_remote(text) else text
        files = storage.listing(folder)
        manifest_path = Manifest.path(folder, split)
        if not files and not (is_remote(folder) or Path(folder).is_dir()):
            what = "is a file, not a shard folder" if Path(folder).exists() else "does not exist"
            raise FileNotFoundError(f"shard folder {folder} {what}")
        if name_of(manifest_path) not in files:
            splits = sorted(n[:-5] for n in files if n.endswith(".json") and not n.startswith("."))
            raise FileNotFoundError(
                f"{manifest_path} not found (splits here: {', '.join(splits) or 'none'}); build "
                "shards with `python -m pipeline.build_shards`"
            )
        manifest = Manifest.load(manifest_path)
        tars = [str(storage.join(folder, s.name)) for s in manifest.shards]
        indexes = [str(index_path(t)) for t in tars]
        found = {f: files[name_of(f)] for f in tars + indexes if name_of(f) in files}
        missing = [t for t in tars if t not in found]
        if missing:
            raise FileNotFoundError(
                f"{manifest_path} lists {len(missing)} shard(s) that are missing: {missing[0]}"
            )
    if not tars:
        raise FileNotFoundError(f"no shards for split {split!r} in {text}")
    if manifest is not None:
        listed = {s.name for s in manifest.shards}
        strays = [name_of(t) for t in tars if name_of(t) not in listed]
        if strays:
            raise DataError(
                f"shard {strays[0]} is not in {manifest_path}: the shard list and manifest disagree"
            )
    return ShardSet(tars, indexes, manifest, found)


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
            f"{Manifest.path(str(shards), split)}"
        )
