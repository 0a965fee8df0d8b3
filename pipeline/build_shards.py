"""Turn an ImageNet-style image tree into pre-shuffled WebDataset shards with DALI index files.

    python -m pipeline.build_shards SRC OUT --split train [--shard-size-mb 1024] [--workers N]
    python -m pipeline.build_shards VAL_DIR OUT --split val --val-labels LOC_val_solution.csv \
        --classes OUT/train.json
    python -m pipeline.build_shards --verify OUT --split train

Samples are shuffled globally with the seed before being cut into shards, because DALI reads tars
sequentially and only shuffles within a buffer; the shuffle holds `--sort-buffer` images in memory,
whatever the data set's size. Each shard is written under a temporary name and renamed when
complete; a progress file records finished shards, so rerunning an interrupted command keeps them
(after checking size and sha256) and writes only the rest.

OUT may be a bucket, `s3://bucket/prefix`: each shard is written in a local staging folder
(`--staging`, which also keeps the progress file), uploaded as it completes (in parts where it is
large) with its digest recorded on the object, and removed; a rerun keeps the uploads whose size and
digest match, and the manifest goes up last. The roles live apart: `shard_listing`
lists the input, `shard_labels` labels it by input mode (`imagenet_labels` reads ImageNet's label
files), `shard_order` shuffles it on disk, `shard_writing` cuts it into shards and writes
them in worker processes, `shard_resume` keeps finished shards across runs, `shard_verify` checks a
finished split.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import pipeline.storage as storage
from pipeline.errors import BuildError, StorageError
from pipeline.formats import FormatError
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.manifest import Manifest, class_mismatch
from pipeline.shard_labels import (
    CLASS_FOLDERS,
    INPUT_MODES,
    LabelCounts,
    Labelling,
    ModeInput,
    read_class_list,
)
from pipeline.shard_order import DEFAULT_SORT_BUFFER, ordered_parts, spill
from pipeline.shard_reports import REPORT_KINDS, Reports, ReportSpill, write_reports
from pipeline.shard_resume import ProgressLog, plan_fingerprint
from pipeline.shard_verify import verify
from pipeline.shard_writing import ShardPlan, cut_shards, publish_shard, run_jobs, shard_jobs
from pipeline.storage import SCHEME, Location, is_remote, upload
from pipeline.wds_format import file_sha256


@dataclass(frozen=True)
class BuildOptions:
    """One build, as the command line gives it (see `parse_args` for each flag's meaning)."""

    src: Path
    out: Location
    """a folder, or an `s3://bucket/prefix` (written through `staging`)"""
    split: str = "train"
    mode: str = CLASS_FOLDERS.name
    """how SRC is read and labelled: the name of one of `shard_labels.INPUT_MODES`, or class
    folders"""
    val_labels: Path | None = None
    synsets: Path | None = None
    classes: Path | None = None
    shard_size_mb: float = 1024
    workers: int = 1
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    strict: bool = False
    quiet: bool = False
    sort_buffer: int = DEFAULT_SORT_BUFFER
    staging: Path | None = None
    """where shards bound for a bucket are written before their upload, and the build's progress
    kept: a rerun with the same one resumes (default: `default_staging(out)`)"""

    @property
    def staging_folder(self) -> Path:
        """Where the build writes: OUT itself, or the staging folder of a bucket's build."""
        if not is_remote(self.out):
            return Path(self.out)
        return self.staging or default_staging(str(self.out))


@dataclass(frozen=True)
class VerifyOptions:
    out: Location
    split: str


def default_staging(url: str) -> Path:
    """A bucket's build stages under the user's cache, one folder per destination, so that a rerun
    of the same command finds its progress."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "maeflow" / "staging" / url[len(SCHEME):].strip("/")


SCRATCH = ".scratch"  # inside OUT while a build runs: its listing and plan, a .tar.gz's tar

# Exit status when damaged data was found: a shard --verify rejects, or an image --strict would not
# skip. The same code as a training run that failed on its data (README, "Exit codes"); 2 is a
# refused command.
DAMAGED_DATA = 5


def labelling(options: BuildOptions, scratch: Path, rejected: Reports) -> Labelling:
    """How the build's input is listed and labelled: its input mode's labelling."""
    if not options.src.exists():
        raise BuildError(f"SRC {options.src} does not exist")
    classes = read_class_list(options.classes) if options.classes else None
    mode = next(m for m in (*INPUT_MODES, CLASS_FOLDERS) if m.name == options.mode)
    return mode.make(
        ModeInput(
            options.src,
            options.split,
            scratch,
            rejected,
            classes,
            options.val_labels,
            options.synsets,
        )
    )


def shuffled(
    options: BuildOptions, labels: Labelling, scratch: Path, skipped: ReportSpill
) -> tuple[list[str], ShardPlan, str]:
    """List, label and shuffle the input into a plan of shards (on disk under `scratch`): the class
    list, the plan and its fingerprint; the images left out go to `skipped`. Raises BuildError
    before any shard is written.
    Memory: `options.sort_buffer` images per worker."""
    parts = spill(labels.candidates(), options.seed, scratch / f"{options.split}.listing")
    try:
        labels.settle()
    except BuildError as err:
        raise BuildError(f"{options.src}: {err}") from None
    if not parts:
        raise BuildError(f"{options.src}: no image files found")
    ordered, counts, digests = [], LabelCounts(), []

    def image_sizes() -> Iterator[int]:
        for part in ordered_parts(parts, labels, options.sort_buffer, options.workers):
            ordered.append(part.path)
            skipped.extend(part.rejected)
            counts.merge(part.labels)
            digests.append(part.digest)
            yield from part.sizes

    plan = ShardPlan(ordered, cut_shards(image_sizes(), int(options.shard_size_mb * 2**20)))
    classes = labels.classes(counts)
    if classes and not options.classes:
        _refuse_other_class_lists(options.out, options.split, classes)
    settings = [options.split, options.seed, options.shard_size_mb, options.max_pixels]
    return classes, plan, plan_fingerprint(digests, classes, settings)


@contextmanager
def scratch_space(out: Path) -> Iterator[Path]:
    """OUT/.scratch for the build's listing and plan, removed when the build ends; a refused build
    leaves OUT as it found it (a .tar.gz's decompressed tar is kept there for a rerun of a killed
    build)."""
    created = not out.exists()
    scratch = out / SCRATCH
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        yield scratch
    except BuildError:
        shutil.rmtree(scratch, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(scratch, ignore_errors=True)


def build(options: BuildOptions) -> int:
    out, split, staging = options.out, options.split, options.staging_folder
    source = str(options.src.resolve())
    with (
        scratch_space(staging) as scratch,
        ReportSpill(scratch / f"{split}.skipped.jsonl") as skipped,
    ):
        classes, plan, fingerprint = shuffled(
            options, labelling(options, scratch, skipped), scratch, skipped
        )
        log = ProgressLog(staging, out, split, fingerprint, source)
        shards = len(plan.shard_sizes)
        done = len(log.records)
        if done and done < shards:
            print(f"resuming: {done} of {shards} shards already complete, {shards - done} to write")
        elif done:
            print(f"all {shards} shards already complete and intact")
        _write_shards(options, plan, log)
        # The reports go in place before the manifest that counts them.
        rejected = write_reports(Manifest.report_path(staging, split, "rejected"),
                                 itertools.chain(skipped, log.reports("rejected")))
        converted = write_reports(
            Manifest.report_path(staging, split, "converted"), log.reports("converted")
        )
        if is_remote(out):
            for kind in REPORT_KINDS:
                report = Manifest.report_path(staging, split, kind)
                upload(report, str(Manifest.report_path(out, split, kind)), file_sha256(report))
    records = [log.records[i] for i in range(shards)]
    manifest = Manifest(
        split=split,
        samples=sum(r.samples for r in records),
        classes=classes,
        shards=[r for r in records if r.samples],
        rejected=rejected,
        converted=converted,
        seed=options.seed,
        source=source,
        plan=fingerprint,
    )
    storage.write_text(Manifest.path(out, split), manifest.to_json())
    _print_summary(manifest, out, staging)
    return DAMAGED_DATA if options.strict and rejected else 0


def _write_shards(options: BuildOptions, plan: ShardPlan, log: ProgressLog) -> None:
    """Write the plan's shards the log does not hold, adding each to the log as it completes."""
    shards = len(plan.shard_sizes)
    started = time.perf_counter()
    todo = sum(size for i, size in enumerate(plan.shard_sizes) if i not in log.records)
    with tqdm(total=todo, unit="img", desc=f"{options.split} shards", disable=options.quiet) as bar:
        read = [0]

        def advance(images: int, size: int) -> None:
            read[0] += size
            show_rate()
            bar.update(images)

        def show_rate() -> None:
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(
                MBps=f"{read[0] / elapsed / 2**20:.1f}",
                shards=f"{len(log.records)}/{shards}",
                refresh=False,
            )

        staging = options.staging_folder
        jobs = shard_jobs(plan, options.split, staging, options.max_pixels, skip=set(log.records))
        for result in run_jobs(jobs, options.workers, advance):
            publish_shard(result.record, staging, options.out)
            log.add(result)
            show_rate()


def _refuse_other_class_lists(out: Location, split: str, classes: list[str]) -> None:
    """Labels index the class list: a split built beside another with a different list would give
    its labels other meanings (a class folder missing from val shifts every later label)."""
    for name in sorted(n for n in storage.listing(out) if n.endswith(".json")):
        other, manifest_path = name[: -len(".json")], storage.join(out, name)
        if other == split or other.endswith(".progress"):
            continue
        try:
            theirs = Manifest.load(manifest_path).classes
        except (ValueError, TypeError, KeyError):
            continue  # not a manifest
        mismatch = class_mismatch(theirs, classes)
        if mismatch:
            raise BuildError(
                f"{split}'s classes differ from {manifest_path.name}'s ({mismatch}): its labels "
                f"would mean other classes; pass --classes {manifest_path} to label it with that "
                "list"
            )


def _print_summary(manifest: Manifest, out: Location, staging: Path) -> None:
    size = sum(s.bytes for s in manifest.shards) / 2**20
    print(
        f"{manifest.split}: {manifest.samples} kept ({manifest.converted} converted to RGB JPEG), "
        f"{manifest.rejected} rejected -> {len(manifest.shards)} shards, {size:.1f} MiB in {out}"
    )
    for item in itertools.islice(Manifest.reports(staging, manifest.split, "rejected"), 20):
        print(f"  rejected {item['path']}: {item['reason']}", file=sys.stderr)
    if manifest.rejected > 20:
        print(
            f"  ... and {manifest.rejected - 20} more (see "
            f"{Manifest.report_path(out, manifest.split, 'rejected')})",
            file=sys.stderr,
        )


def parse_args(argv: list[str] | None) -> BuildOptions | VerifyOptions:
    parser = argparse.ArgumentParser(prog="maeflow-shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "src",
        nargs="?",
        help="image tree SRC/<class>/<image>, a flat val folder, or an archive "
        "(tar, .tar.gz, zip: ImageNet's train tar of class tars, the Kaggle zip...), or a folder "
        "of per-class tars (ImageNet-21k)",
    )
    parser.add_argument(
        "out", nargs="?",
        help="output folder for shards, indexes and the manifest, or s3://bucket/prefix",
    )
    parser.add_argument(
        "--split", default="train", help="split name: shard prefix and manifest name"
    )
    for mode in INPUT_MODES:  # the input modes: one at most
        if mode.value:
            parser.add_argument(mode.flag, metavar=mode.value, help=mode.help)
        else:
            parser.add_argument(mode.flag, action="store_true", help=mode.help)
    parser.add_argument(
        "--synsets",
        help="the devkit's meta.mat, or a text file of '<ILSVRC2012_ID> <wnid>' lines "
        "(a bare wnid list is refused: its order is not the ids')",
    )
    parser.add_argument(
        "--classes", help="class list to reuse (the train manifest, or one class per line)"
    )
    parser.add_argument(
        "--shard-size-mb", type=float, default=1024, help="target shard size in MiB"
    )
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject larger images"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit non-zero if any image was rejected"
    )
    parser.add_argument(
        "--verify", metavar="OUT",
        help="re-read and check the shards in OUT (a folder or s3://...) instead of building",
    )
    parser.add_argument(
        "--staging", metavar="DIR",
        help="with an s3:// OUT: where shards are written before their upload and the build's "
        "progress is kept; rerun with the same one to resume (default: "
        "~/.cache/maeflow/staging/<bucket>/<prefix>)",
    )
    parser.add_argument(
        "--sort-buffer",
        type=int,
        default=DEFAULT_SORT_BUFFER,
        help="images the global shuffle "
        "holds in memory at once (about 1 KB each); the shards are the same whatever it is",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.verify:
        return VerifyOptions(_location(args.verify), args.split)
    if not (args.src and args.out):
        parser.error("SRC and OUT are required (or use --verify OUT)")
    modes = [mode for mode in INPUT_MODES if getattr(args, mode.name)]
    if len(modes) > 1:
        parser.error(f"{modes[0].flag} and {modes[1].flag} are different inputs: pass one")
    if args.shard_size_mb <= 0 or args.workers < 1 or args.max_pixels < 1 or args.sort_buffer < 1:
        parser.error(
            "--shard-size-mb and --max-pixels must be positive, --workers and --sort-buffer at "
            "least 1"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.split):
        parser.error(
            f"--split {args.split!r}: a split name is letters, digits, '_' and '-' (it names files)"
        )
    return BuildOptions(
        src=Path(args.src),
        out=_location(args.out),
        split=args.split,
        mode=modes[0].name if modes else CLASS_FOLDERS.name,
        val_labels=Path(args.val_labels) if args.val_labels else None,
        synsets=Path(args.synsets) if args.synsets else None,
        classes=Path(args.classes) if args.classes else None,
        shard_size_mb=args.shard_size_mb,
        workers=args.workers,
        seed=args.seed,
        max_pixels=args.max_pixels,
        strict=args.strict,
        quiet=args.quiet,
        sort_buffer=args.sort_buffer,
        staging=Path(args.staging) if args.staging else None,
    )


def _location(text: str) -> Location:
    return text if is_remote(text) else Path(text)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        if isinstance(options, VerifyOptions):
            return DAMAGED_DATA if verify(options.out, options.split) else 0
        return build(options)
    except (BuildError, FormatError, StorageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
