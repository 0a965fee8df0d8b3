"""Resuming an interrupted shard build: a progress file records every finished shard, and a rerun of
the same command (same files, same settings: the plan fingerprint) keeps those that are intact."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.manifest import Manifest, ShardRecord
from pipeline.shard_sources import BuildError
from pipeline.shard_writing import ShardResult
from pipeline.wds_format import file_sha256, index_path


def plan_fingerprint(part_digests: Iterable[bytes], classes: list[str], settings: list) -> str:
    """Identifies a build: its settings, its class list and every image's name, size and label in shuffle order
    (each ordered part's digest of them)."""
    digest = hashlib.sha256(json.dumps([*settings, classes]).encode())
    for part in part_digests:
        digest.update(part)
    return digest.hexdigest()[:16]


def _progress_path(out: Path, split: str) -> Path:
    return out / f".{split}.progress.jsonl"


def finished_shards(out: Path, split: str, plan: str, source: str) -> dict[int, ShardResult]:
    """Shards an earlier run of the same command completed, re-checked by size and sha256.

    The progress file (kept after a build finishes) holds each shard's record and rejections, a line per shard as
    it finished, so a rerun, complete or interrupted, can rebuild the manifest without re-reading finished shards.
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
        header, *lines = progress_path.read_text().splitlines()
        progress = json.loads(header)
        if (progress["plan"], progress["source"]) != (plan, source):
            raise BuildError(f"{out} holds an unfinished {split} build of {progress['source']} with other settings; "
                             "choose another OUT or delete it first")
        for line in lines:
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a kill cut short: its shard is written again
            saved[raw["index"]] = raw
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


class ProgressLog:
    """Appends each finished shard to the progress file: a line per shard, so that its cost stays the same
    whether the build has a hundred shards or a hundred thousand."""

    def __init__(self, out: Path, split: str, plan: str, source: str, done: dict[int, ShardResult]) -> None:
        self.path = _progress_path(out, split)
        header = json.dumps({"plan": plan, "source": source})
        atomic_write_text(self.path, "".join([header + "\n", *(self._line(r) for _, r in sorted(done.items()))]))

    @staticmethod
    def _line(result: ShardResult) -> str:
        return json.dumps(asdict(result)) + "\n"

    def add(self, result: ShardResult) -> None:
        with open(self.path, "a") as log:
            log.write(self._line(result))
            log.flush()
            os.fsync(log.fileno())
