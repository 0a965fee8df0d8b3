"""Turn an ImageNet-style image tree into pre-shuffled WebDataset shards with DALI index files.

    python -m pipeline.build_shards SRC OUT --split train [--shard-size-mb 1024] [--workers N]
    python -m pipeline.build_shards VAL_DIR OUT --split val --val-labels LOC_val_solution.csv \
        --classes OUT/train.json
    python -m pipeline.build_shards --verify OUT --split train

Samples are shuffled globally with the seed before being cut into shards, because DALI reads tars
sequentially and only shuffles within a buffer. Each shard is written under a temporary name and
renamed when complete; a progress file records finished shards, so rerunning an interrupted command
keeps them (after checking size and sha256) and writes only the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.images import DEFAULT_MAX_PIXELS, RejectedImage, prepare_image
from pipeline.manifest import Manifest, ShardRecord
from pipeline.wds_format import Member, ShardWriter, atomic_write_text, file_sha256, index_of_tar, read_members

TAR_OVERHEAD_PER_SAMPLE = 3 * 1024  # three headers plus padding, for planning shard sizes


class BuildError(Exception):
    """A problem with the command's inputs or OUT: reported in one line, nothing written."""


@dataclass(frozen=True)
class SourceImage:
    path: str
    rel: str
    class_name: str
    label: int
    size: int


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


# ---------------------------------------------------------------- listing the source


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
            from scipy.io import loadmat
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


# ---------------------------------------------------------------- planning and writing


def plan_shards(
    images: list[SourceImage], seed: int, shard_bytes: int, split: str, out: Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[ShardJob]:
    """Shuffle globally, then cut into shards of about `shard_bytes` by source file size."""
    order = list(images)
    random.Random(seed).shuffle(order)
    groups: list[list[tuple[str, SourceImage]]] = [[]]
    filled = 0
    for position, image in enumerate(order):
        cost = image.size + TAR_OVERHEAD_PER_SAMPLE
        if groups[-1] and filled + cost > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append((f"{position:08d}", image))
        filled += cost
    return [ShardJob(i, str(out / f"{split}-{i:06d}.tar"), g, max_pixels) for i, g in enumerate(groups)]


PROGRESS_EVERY = 32  # images between progress reports from a worker


def build_shard(job: ShardJob, report: Callable[[int, int], None] | None = None) -> ShardResult:
    """Write one shard (tar + idx) under temporary names, then rename both into place.

    `report(images, bytes)` is called every few images so a progress bar can move within a shard.
    """
    tar = Path(job.tar)
    tmp_tar, tmp_idx = tar.with_name(tar.name + ".tmp"), tar.with_name(tar.stem + ".idx.tmp")
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
                prepared = prepare_image(Path(image.path), job.max_pixels)
            except RejectedImage as err:
                rejected.append({"path": image.rel, "reason": str(err)})
                continue
            meta = {"path": image.rel, "class": image.class_name, "width": prepared.width, "height": prepared.height}
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
    tmp_idx.write_text(writer.index_text())
    os.replace(tmp_tar, tar)
    os.replace(tmp_idx, tar.with_suffix(".idx"))
    record = ShardRecord(tar.name, samples, tar.stat().st_size, file_sha256(tar))
    return ShardResult(job.index, record, rejected, converted)


def _plan_fingerprint(images: list[SourceImage], classes: list[str], args: argparse.Namespace) -> str:
    digest = hashlib.sha256()
    settings = [args.split, args.seed, args.shard_size_mb, args.max_pixels, classes]
    digest.update(json.dumps(settings).encode())
    for image in images:
        digest.update(f"{image.rel}\0{image.size}\0{image.label}\n".encode())
    return digest.hexdigest()[:16]


def _progress_path(out: Path, split: str) -> Path:
    return out / f".{split}.progress.json"


def _finished_shards(out: Path, split: str, plan: str, source: str) -> dict[int, ShardResult]:
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
            tar.is_file() and tar.stat().st_size == record.bytes and tar.with_suffix(".idx").is_file()
            and file_sha256(tar) == record.sha256
        )
        if intact:
            finished[index] = ShardResult(index, record, raw["rejected"], raw["converted"])
    return finished


def _save_progress(out: Path, split: str, plan: str, source: str, done: dict[int, ShardResult]) -> None:
    payload = {"plan": plan, "source": source, "done": {str(i): asdict(r) for i, r in sorted(done.items())}}
    atomic_write_text(_progress_path(out, split), json.dumps(payload))


class _QueueReport:
    """A picklable `report` for pool workers: sends (images, bytes) to the parent's queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, images: int, size: int) -> None:
        self.queue.put((images, size))


def _run_jobs(jobs: list[ShardJob], workers: int, report: Callable[[int, int], None]) -> Iterator[ShardResult]:
    """Results in completion order; progress reaches `report` in this process while shards are written."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield build_shard(job, report)
        return
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager, context.Pool(workers) as pool:
        ticks = manager.Queue()
        pending = [pool.apply_async(build_shard, (job, _QueueReport(ticks))) for job in jobs]
        while pending:
            while not ticks.empty():
                report(*ticks.get())
            # One look per job per poll: a job that completes between two looks must land in exactly one list.
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


def build(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise BuildError(f"SRC {src} does not exist or is not a folder")
    classes = read_class_list(Path(args.classes)) if args.classes else None
    if args.val_labels:
        classes, images, unlabeled = list_flat_val(src, Path(args.val_labels), args.synsets and Path(args.synsets),
                                                   classes)
    else:
        (classes, images), unlabeled = list_class_tree(src, classes), []
    if not images:
        raise BuildError(f"{src}: no image files found")
    source = str(src.resolve())
    plan = _plan_fingerprint(images, classes, args)
    jobs = plan_shards(images, args.seed, int(args.shard_size_mb * 2**20), args.split, out, args.max_pixels)
    done = _finished_shards(out, args.split, plan, source)
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if j.index not in done]
    if done and todo:
        print(f"resuming: {len(done)} of {len(jobs)} shards already complete, {len(todo)} to write")
    elif done:
        print(f"all {len(jobs)} shards already complete and intact")

    started = time.perf_counter()
    total_images = sum(len(j.samples) for j in todo)
    with tqdm(total=total_images, unit="img", desc=f"{args.split} shards", disable=args.quiet) as bar:
        read = [0]

        def advance(images: int, size: int) -> None:
            read[0] += size
            show_rate()
            bar.update(images)

        def show_rate() -> None:
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(MBps=f"{read[0] / elapsed / 2**20:.1f}", shards=f"{len(done)}/{len(jobs)}",
                            refresh=False)

        for result in _run_jobs(todo, args.workers, advance):
            done[result.index] = result
            _save_progress(out, args.split, plan, source, done)
            show_rate()

    results = [done[j.index] for j in jobs]
    rejected = unlabeled + [r for res in results for r in res.rejected]
    manifest = Manifest(
        split=args.split, samples=sum(r.record.samples for r in results), classes=classes,
        shards=[r.record for r in results if r.record.samples], rejected=rejected,
        converted=[c for res in results for c in res.converted], seed=args.seed, source=source, plan=plan,
    )
    atomic_write_text(Manifest.path(out, args.split), manifest.to_json())
    _print_summary(manifest, out)
    return 1 if args.strict and rejected else 0


def _print_summary(manifest: Manifest, out: Path) -> None:
    size = sum(s.bytes for s in manifest.shards) / 2**20
    print(f"{manifest.split}: {manifest.samples} kept ({len(manifest.converted)} converted to RGB JPEG), "
          f"{len(manifest.rejected)} rejected -> {len(manifest.shards)} shards, {size:.1f} MiB in {out}")
    for item in manifest.rejected[:20]:
        print(f"  rejected {item['path']}: {item['reason']}", file=sys.stderr)
    if len(manifest.rejected) > 20:
        print(f"  ... and {len(manifest.rejected) - 20} more (see {Manifest.path(out, manifest.split)})",
              file=sys.stderr)


# ---------------------------------------------------------------- verification


def verify_shard(out: Path, record: ShardRecord) -> list[str]:
    """Problems found in one shard: checksum, index, sample structure, undecodable images."""
    from PIL import Image  # only verification decodes in full

    tar = out / record.name
    if not tar.is_file():
        return ["missing"]
    problems = []
    if tar.stat().st_size != record.bytes or file_sha256(tar) != record.sha256:
        problems.append("size or sha256 differs from the manifest")
    idx = tar.with_suffix(".idx")
    if not idx.is_file() or idx.read_text() != index_of_tar(tar):
        problems.append("index file missing or does not match the tar")
    samples = 0
    for info, data in read_members(tar):
        if not info.name.endswith(".jpg"):
            continue
        samples += 1
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as err:
            problems.append(f"{info.name}: does not decode ({err})")
    if samples != record.samples:
        problems.append(f"{samples} images, manifest says {record.samples}")
    return problems


def verify(out: Path, split: str) -> int:
    manifest_path = Manifest.path(out, split)
    if not manifest_path.is_file():
        raise BuildError(f"{manifest_path} not found: nothing to verify")
    manifest = Manifest.load(manifest_path)
    bad = 0
    for record in tqdm(manifest.shards, unit="shard", desc=f"verify {split}"):
        problems = verify_shard(out, record)
        bad += bool(problems)
        for problem in problems:
            print(f"{record.name}: {problem}", file=sys.stderr)
    print(f"{split}: {len(manifest.shards) - bad} of {len(manifest.shards)} shards OK, {manifest.samples} samples")
    return 1 if bad else 0


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maeflow-shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("src", nargs="?", help="image tree SRC/<class>/<image>, or a flat val folder")
    parser.add_argument("out", nargs="?", help="output folder for shards, indexes and the manifest")
    parser.add_argument("--split", default="train", help="split name: shard prefix and manifest name")
    parser.add_argument("--val-labels", help="labels for a flat val folder: Kaggle CSV or devkit ground truth")
    parser.add_argument("--synsets", help="devkit meta.mat or text file mapping ILSVRC ids (line number) to wnids")
    parser.add_argument("--classes", help="class list to reuse (the train manifest, or one class per line)")
    parser.add_argument("--shard-size-mb", type=float, default=1024, help="target shard size in MiB")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject larger images")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any image was rejected")
    parser.add_argument("--verify", metavar="OUT", help="re-read and check the shards in OUT instead of building")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.verify and not (args.src and args.out):
        parser.error("SRC and OUT are required (or use --verify OUT)")
    if args.shard_size_mb <= 0 or args.workers < 1:
        parser.error("--shard-size-mb must be positive and --workers at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return verify(Path(args.verify), args.split) if args.verify else build(args)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
