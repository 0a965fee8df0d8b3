"""Resuming an interrupted shard build: a progress file records every finished shard, and a rerun of
the same command (same files, same settings: the plan fingerprint) keeps those that are intact."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pipeline.storage as storage
from pipeline.atomic import atomic_path
from pipeline.errors import BuildError
from pipeline.formats import check_format, stamp
from pipeline.manifest import Manifest, ShardRecord
from pipeline.shard_writing import ShardResult
from pipeline.storage import Location, is_remote, name_of
from pipeline.wds_format import file_sha256, index_path

# A resumed build checks its finished shards' digests a few at a time: a bucket's latency, a
# disk's queue.
_DIGESTS_AT_ONCE = 8


def plan_fingerprint(part_digests: Iterable[bytes], classes: list[str], settings: list) -> str:
    """Identifies a build: its settings, its class list and every image's name, size and label in
    shuffle order (each ordered part's digest of them)."""
    digest = hashlib.sha256(json.dumps([*settings, classes]).encode())
    for part in part_digests:
        digest.update(part)
    return digest.hexdigest()[:16]


def _progress_path(staging: Path, split: str) -> Path:
    return staging / f".{split}.progress.jsonl"


class ProgressLog:
    """The progress file: a header (the plan's fingerprint, the source), then a line per finished
    shard as it finished, holding its record and its reports (kept after the build, so that a rerun
    rebuilds the manifest without re-reading finished shards). In memory a shard costs its record
    and where its line lies, whatever the number of its reports; a line costs the same whether the
    build has a hundred shards or a hundred thousand."""

    def __init__(self, staging: Path, out: Location, split: str, plan: str, source: str) -> None:
        """Starts the log of a build in `staging` (OUT itself, unless OUT is a bucket), keeping the
        shards an earlier run of the same command finished that are intact in OUT (re-checked by
        size and sha256); BuildError where OUT holds another build of this split."""
        self.path = _progress_path(staging, split)
        self.records: dict[int, ShardRecord] = {}
        """the finished shards' records, by index in the plan"""
        self._offsets: dict[int, int] = {}
        _refuse_other_builds(out, self.path, split, plan, source)
        earlier = _earlier_lines(self.path)
        intact = _intact(out, [record for _, record in earlier.values()])
        with atomic_path(self.path) as tmp, open(tmp, "wb") as log:
            log.write(
                (
                    json.dumps(stamp("build_progress", {"plan": plan, "source": source})) + "\n"
                ).encode()
            )
            if earlier:
                with open(self.path, "rb") as old:
                    for index, (offset, record) in sorted(earlier.items()):
                        if record.name in intact:
                            old.seek(offset)
                            self._offsets[index], self.records[index] = log.tell(), record
                            log.write(old.readline())

    def add(self, result: ShardResult) -> None:
        with open(self.path, "ab") as log:
            self._offsets[result.index], self.records[result.index] = log.tell(), result.record
            log.write((json.dumps(asdict(result)) + "\n").encode())
            log.flush()
            os.fsync(log.fileno())

    def reports(self, kind: str) -> Iterator[dict]:
        """The finished shards' reports of one kind ("rejected", "converted"), in shard order, read
        back from the log."""
        with open(self.path, "rb") as log:
            for index in sorted(self._offsets):
                log.seek(self._offsets[index])
                yield from json.loads(log.readline())[kind]


def _refuse_other_builds(
    out: Location, progress_path: Path, split: str, plan: str, source: str
) -> None:
    """A finished or unfinished build of this split from other files or settings, or shards no build
    of this command wrote, are never mixed with this one's."""
    manifest_path = Manifest.path(out, split)
    if storage.exists(manifest_path):
        old = Manifest.load(manifest_path)
        if (old.plan, old.source) != (plan, source):
            raise BuildError(
                f"{out} already holds {split} shards built from {old.source or 'another source'} "
                "with other settings or files, or by a maeflow that shuffled otherwise; choose "
                "another OUT or delete them first"
            )
    if progress_path.is_file():
        with open(progress_path) as log:
            progress = json.loads(log.readline())
        check_format("build_progress", progress, str(progress_path))
        if (progress["plan"], progress["source"]) != (plan, source):
            raise BuildError(
                f"{out} holds an unfinished {split} build of {progress['source']} with other "
                "settings or files, or by a maeflow that shuffled otherwise; choose another OUT "
                "or delete it first"
            )
    elif not storage.exists(manifest_path):
        strays = sorted(fnmatch.filter(storage.listing(out), f"{split}-*.tar"))
        if strays:
            raise BuildError(
                f"{out} holds {strays[0]} but no {name_of(manifest_path)}: not written by this "
                "command (or by a build whose staging folder was another: pass its --staging); "
                "choose another OUT or delete them first"
            )


def _earlier_lines(path: Path) -> dict[int, tuple[int, ShardRecord]]:
    """Each shard the progress file says finished: where its last line lies, and its record."""
    earlier: dict[int, tuple[int, ShardRecord]] = {}
    if not path.is_file():
        return earlier
    with open(path, "rb") as log:
        offset = len(log.readline())  # the header, checked by `_refuse_other_builds`
        for line in log:
            try:
                raw = json.loads(line)
                earlier[raw["index"]] = offset, ShardRecord(**raw["record"])
            except json.JSONDecodeError:
                pass  # the line a kill cut short: its shard is written again
            offset += len(line)
    return earlier


def _intact(out: Location, records: list[ShardRecord]) -> set[str]:
    """The names of the shards among `records` that are in OUT whole: the size listed, an index
    beside, the digest (recorded by the upload in a bucket; read from the bytes on a disk)."""
    listed = storage.listing(out)
    candidates = [
        r for r in records
        if listed.get(r.name) == r.bytes and name_of(index_path(str(r.name))) in listed
    ]

    def digest(record: ShardRecord) -> str | None:
        tar = storage.join(out, record.name)
        if is_remote(out):
            found = storage.stored(tar)
            return found.sha256 if found else None
        return file_sha256(tar)

    with ThreadPoolExecutor(_DIGESTS_AT_ONCE) as pool:
        digests = list(pool.map(digest, candidates))
    return {r.name for r in records if r.samples == 0} | {
        r.name for r, d in zip(candidates, digests, strict=True) if d == r.sha256
    }
