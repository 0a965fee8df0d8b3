"""Resuming an interrupted shard build: a progress file records every finished shard, and a rerun of
the same command (same files, same settings: the plan fingerprint) keeps those that are intact."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.manifest import Manifest, ShardRecord
from pipeline.shard_sources import BuildError, SourceImage
from pipeline.shard_writing import ShardResult
from pipeline.wds_format import file_sha256, index_path


def plan_fingerprint(images: list[SourceImage], classes: list[str], settings: list) -> str:
    """Identifies a build: its settings and every source file's name, size and label."""
    digest = hashlib.sha256()
    digest.update(json.dumps([*settings, classes]).encode())
    for image in images:
        digest.update(f"{image.rel}\0{image.size}\0{image.label}\n".encode())
    return digest.hexdigest()[:16]


def _progress_path(out: Path, split: str) -> Path:
    return out / f".{split}.progress.json"


def finished_shards(out: Path, split: str, plan: str, source: str) -> dict[int, ShardResult]:
    """Shards an earlier run of the same command completed, re-checked by size and sha256.

    The progress file (kept after a build finishes) holds each shard's record and rejections, so a
    rerun, complete or interrupted, can rebuild the manifest without re-reading finished shards.
    """
    manifest_path, progress_path = Manifest.path(out, split), _progress_path(out, split)
    if manifest_path.is_file():
        old = Manifest.load(manifest_path)
        if (old.plan, old.source) != (plan, source):
            raise BuildError(
                f"{out} already holds {split} shards built from {old.source or 'another source'} with other "
                "settings or files; choose another OUT or delete them first"
            )
    saved = {}
    if progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        if (progress["plan"], progress["source"]) != (plan, source):
            raise BuildError(f"{out} holds an unfinished {split} build of {progress['source']} with other settings; "
                             "choose another OUT or delete it first")
        saved = {int(i): r for i, r in progress["done"].items()}
    elif not manifest_path.is_file():
        strays = sorted(out.glob(f"{split}-*.tar")) if out.is_dir() else []
        if strays:
            raise BuildError(f"{out} holds {strays[0].name} but no {manifest_path.name}: not written by this "
                             "command; choose another OUT or delete them first")
    finished = {}
    for index, raw in saved.items():
        record = ShardRecord(**raw["record"])
        tar = out / record.name
        intact = record.samples == 0 or (
            tar.is_file() and tar.stat().st_size == record.bytes and index_path(tar).is_file()
            and file_sha256(tar) == record.sha256
        )
        if intact:
            finished[index] = ShardResult(index, record, raw["rejected"], raw["converted"])
    return finished


def save_progress(out: Path, split: str, plan: str, source: str, done: dict[int, ShardResult]) -> None:
    payload = {"plan": plan, "source": source, "done": {str(i): asdict(r) for i, r in sorted(done.items())}}
    atomic_write_text(_progress_path(out, split), json.dumps(payload))
