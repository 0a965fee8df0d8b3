"""Cutting the shuffled images into shards and writing them, in parallel worker processes.

Each shard is a USTAR tar (`<key>.jpg`, `<key>.cls`, `<key>.json` per sample) plus its DALI index,
written under a temporary name and renamed when complete. Workers report progress per few images
through a queue, so the parent's progress bar moves within a shard.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import time
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline.storage as storage
from pipeline.archives import read_entry
from pipeline.atomic import atomic_write_text, durable_replace, temporary_name
from pipeline.images import RejectedImage, prepare_image
from pipeline.manifest import ShardRecord
from pipeline.shard_labels import SourceImage
from pipeline.shard_order import read_images
from pipeline.storage import Location, is_remote, upload
from pipeline.wds_format import Member, ShardWriter, file_sha256, index_path

TAR_OVERHEAD_PER_SAMPLE = 3 * 1024  # three headers plus padding, for planning shard sizes
PROGRESS_EVERY = 32  # images between progress reports from a worker


@dataclass(frozen=True)
class ShardJob:
    index: int
    tar: str
    samples: list[tuple[str, SourceImage]]  # (key, image)
    max_pixels: int


@dataclass
class ShardResult:
    index: int
    record: ShardRecord
    rejected: list[dict]
    converted: list[dict]


@dataclass(frozen=True)
class ShardPlan:
    """The shuffled images, kept on disk in ordered parts, and how many of them each shard takes."""

    parts: list[Path]
    shard_sizes: list[int]

    @property
    def images(self) -> int:
        return sum(self.shard_sizes)


def cut_shards(image_sizes: Iterable[int], shard_bytes: int) -> list[int]:
    """Images per shard, cutting the shuffled images into shards of about `shard_bytes` by source
    file size."""
    shard_sizes: list[int] = []
    filled = 0
    for size in image_sizes:
        cost = size + TAR_OVERHEAD_PER_SAMPLE
        if not shard_sizes or filled + cost > shard_bytes:
            shard_sizes.append(0)
            filled = 0
        shard_sizes[-1] += 1
        filled += cost
    return shard_sizes


def shard_jobs(
    plan: ShardPlan, split: str, out: Path, max_pixels: int, skip: Container[int]
) -> Iterator[ShardJob]:
    """The plan's shards but those in `skip`, one at a time, read back in order: a sample's key is
    its place in the whole shuffle."""
    images = read_images(plan.parts)
    position = 0
    for index, size in enumerate(plan.shard_sizes):
        samples = list(itertools.islice(images, size))
        if index not in skip:
            yield ShardJob(
                index,
                str(out / f"{split}-{index:06d}.tar"),
                [(f"{position + i:08d}", image) for i, image in enumerate(samples)],
                max_pixels,
            )
        position += size


def build_shard(job: ShardJob, report: Callable[[int, int], None] | None = None) -> ShardResult:
    """Write one shard (tar + idx) under temporary names, then rename both into place.

    `report(images, bytes)` is called every few images so a progress bar can move within a shard.
    """
    tar = Path(job.tar)
    tmp_tar = temporary_name(tar)
    writer = ShardWriter(tmp_tar)
    rejected, converted, samples = [], [], 0
    unreported = [0, 0]
    try:
        for position, (key, image) in enumerate(job.samples, start=1):
            unreported = [unreported[0] + 1, unreported[1] + image.size]
            if report and (position % PROGRESS_EVERY == 0 or position == len(job.samples)):
                report(*unreported)
                unreported = [0, 0]
            try:
                prepared = prepare_image(image.read(), job.max_pixels)
            except OSError as err:  # the archive is damaged or cut short there
                rejected.append({"path": image.rel, "reason": f"unreadable: {err}"})
                continue
            except RejectedImage as err:
                rejected.append({"path": image.rel, "reason": str(err)})
                continue
            meta = {"path": image.rel, "width": prepared.width, "height": prepared.height}
            if image.class_name:
                meta["class"] = image.class_name
            if image.key:  # a repacked WebDataset sample keeps its key and its text members
                meta["key"] = image.key
                meta.update(side_members(image))
            if prepared.conversion:
                meta["converted"] = prepared.conversion
                converted.append({"path": image.rel, "conversion": prepared.conversion})
            writer.add(Member(key, "jpg", prepared.data))
            writer.add(Member(key, "cls", str(image.label).encode()))
            writer.add(Member(key, "json", json.dumps(meta, sort_keys=True).encode()))
            samples += 1
    finally:
        writer.close()
    if not samples:  # every image rejected: an empty tar would stop DALI's reader, so write none
        tmp_tar.unlink()
        return ShardResult(job.index, ShardRecord(tar.name, 0, 0, ""), rejected, converted)
    # The index goes in place first, so that a tar in place always has its index beside it.
    atomic_write_text(index_path(tar), writer.index_text())
    durable_replace(tmp_tar, tar)
    record = ShardRecord(tar.name, samples, tar.stat().st_size, file_sha256(tar))
    return ShardResult(job.index, record, rejected, converted)


def publish_shard(record: ShardRecord, staging: Path, out: Location) -> None:
    """A finished shard into a bucket OUT: its index, then its tar (a tar with an index beside it is
    a shard that is there), each recorded with its digest; then the staged copies go. Nothing to do
    where OUT is the folder the shard was written in."""
    if not is_remote(out) or not record.samples:
        return
    tar = staging / record.name
    index = index_path(tar)
    upload(index, index_path(str(storage.join(out, record.name))), file_sha256(index))
    upload(tar, str(storage.join(out, record.name)), record.sha256)
    index.unlink()
    tar.unlink()


def side_members(image: SourceImage) -> dict[str, Any]:
    """A repacked sample's .txt (as text) and .json (parsed) members; one that cannot be read is
    noted as such."""
    found: dict[str, Any] = {}
    for ext, entry in image.side:
        try:
            text = read_entry(entry).decode("utf-8", errors="replace")
            found[ext] = json.loads(text) if ext == "json" else text
        except (OSError, json.JSONDecodeError) as err:
            found[ext] = f"unreadable: {err}"
    return found


class _QueueReport:
    """A picklable `report` for pool workers: sends (images, bytes) to the parent's queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, images: int, size: int) -> None:
        self.queue.put((images, size))


def run_jobs(
    jobs: Iterable[ShardJob], workers: int, report: Callable[[int, int], None]
) -> Iterator[ShardResult]:
    """Results in completion order; progress reaches `report` in this process while shards are
    written. Jobs are taken from `jobs` as workers free up (two in hand per worker), so only those
    shards' samples are in memory."""
    if workers <= 1:
        for job in jobs:
            yield build_shard(job, report)
        return
    upcoming = iter(jobs)
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager, context.Pool(workers) as pool:
        ticks = manager.Queue()
        pending: list = []
        while True:
            pending += [pool.apply_async(build_shard, (job, _QueueReport(ticks)))
                        for job in itertools.islice(upcoming, 2 * workers - len(pending))]
            if not pending:
                break
            while not ticks.empty():
                report(*ticks.get())
            # One look per job per poll: a job that completes between two looks must land in exactly
            # one list.
            finished, still_running = [], []
            for job in pending:
                (finished if job.ready() else still_running).append(job)
            pending = still_running
            for result in finished:
                yield result.get()  # re-raises a worker's exception here
            if not finished:
                time.sleep(0.1)
        while not ticks.empty():
            report(*ticks.get())
