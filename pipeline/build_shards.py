"""Turn an ImageNet-style image tree into pre-shuffled WebDataset shards with DALI index files.

    python -m pipeline.build_shards SRC OUT --split train [--shard-size-mb 1024] [--workers N]
    python -m pipeline.build_shards VAL_DIR OUT --split val --val-labels LOC_val_solution.csv \
        --classes OUT/train.json
    python -m pipeline.build_shards --verify OUT --split train

Samples are shuffled globally with the seed before being cut into shards, because DALI reads tars
sequentially and only shuffles within a buffer. Each shard is written under a temporary name and
renamed when complete; a progress file records finished shards, so rerunning an interrupted command
keeps them (after checking size and sha256) and writes only the rest. The roles live apart:
`shard_sources` lists the input, `shard_writing` plans and writes shards in worker processes,
`shard_resume` keeps finished shards across runs, `shard_verify` checks a finished split.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.atomic import atomic_write_text
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.manifest import Manifest, class_mismatch
from pipeline.shard_resume import finished_shards, plan_fingerprint, save_progress
from pipeline.shard_sources import (
    BuildError,
    SourceImage,
    class_folder_images,
    file_list_images,
    flat_val_images,
    images_only,
    read_class_list,
    source_entries,
    unlabeled_images,
    webdataset_images,
)
from pipeline.shard_verify import verify
from pipeline.shard_writing import plan_shards, run_jobs


@dataclass(frozen=True)
class BuildOptions:
    """One build, as the command line gives it (see `parse_args` for each flag's meaning)."""

    src: Path
    out: Path
    split: str = "train"
    val_labels: Path | None = None
    synsets: Path | None = None
    classes: Path | None = None
    shard_size_mb: float = 1024
    workers: int = 1
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    strict: bool = False
    quiet: bool = False
    unlabeled: bool = False
    file_list: bool = False
    webdataset: bool = False


@dataclass(frozen=True)
class VerifyOptions:
    out: Path
    split: str


SCRATCH = ".scratch"  # inside OUT: a .tar.gz's tar while a build runs

# Exit status when damaged data was found: a shard --verify rejects, or an image --strict would not skip. The same
# code as a training run that failed on its data (README, "Exit codes"); 2 is a refused command.
DAMAGED_DATA = 5


def list_images(options: BuildOptions, scratch: Path) -> tuple[list[str], list[SourceImage], list[dict]]:
    """(classes, images, what was skipped while listing) for the build's input and labelling options."""
    src = options.src
    if not src.exists():
        raise BuildError(f"SRC {src} does not exist")
    classes = read_class_list(options.classes) if options.classes else None
    rejected: list[dict] = []
    if options.file_list:
        classes, images = file_list_images(src, rejected)
        return classes, images, rejected
    listing = source_entries(src, options.split, scratch, any_depth=options.unlabeled)
    rejected += listing.problems
    if options.unlabeled:
        return [], unlabeled_images(listing.entries, rejected), rejected
    if options.webdataset:
        classes, images = webdataset_images(listing.entries, rejected)
        return classes, images, rejected
    flat = not any("/" in e.name for e in listing.entries if not e.problem)
    try:
        if options.val_labels or (listing.val_labels is not None and flat):
            classes, images = flat_val_images(listing, options.val_labels, options.synsets, classes, rejected)
        else:
            classes, images = class_folder_images(listing.entries, classes, rejected)
    except BuildError as err:
        raise BuildError(f"{src}: {err}") from None
    return classes, images, rejected


def build(options: BuildOptions) -> int:
    src, out, split = options.src, options.out, options.split
    scratch = out / SCRATCH
    classes, images, skipped = list_images(options, scratch)
    if not images:
        raise BuildError(f"{src}: no image files found")
    images = images_only(images, skipped)
    if classes and not options.classes:
        _refuse_other_class_lists(out, split, classes)
    source = str(src.resolve())
    plan = plan_fingerprint(images, classes, [split, options.seed, options.shard_size_mb, options.max_pixels])
    jobs = plan_shards(images, options.seed, int(options.shard_size_mb * 2**20), split, out, options.max_pixels)
    done = finished_shards(out, split, plan, source)
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if j.index not in done]
    if done and todo:
        print(f"resuming: {len(done)} of {len(jobs)} shards already complete, {len(todo)} to write")
    elif done:
        print(f"all {len(jobs)} shards already complete and intact")

    started = time.perf_counter()
    total_images = sum(len(j.samples) for j in todo)
    with tqdm(total=total_images, unit="img", desc=f"{split} shards", disable=options.quiet) as bar:
        read = [0]

        def advance(images: int, size: int) -> None:
            read[0] += size
            show_rate()
            bar.update(images)

        def show_rate() -> None:
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(MBps=f"{read[0] / elapsed / 2**20:.1f}", shards=f"{len(done)}/{len(jobs)}",
                            refresh=False)

        for result in run_jobs(todo, options.workers, advance):
            done[result.index] = result
            save_progress(out, split, plan, source, done)
            show_rate()

    results = [done[j.index] for j in jobs]
    rejected = skipped + [r for res in results for r in res.rejected]
    manifest = Manifest(
        split=split, samples=sum(r.record.samples for r in results), classes=classes,
        shards=[r.record for r in results if r.record.samples], rejected=rejected,
        converted=[c for res in results for c in res.converted], seed=options.seed, source=source, plan=plan,
    )
    atomic_write_text(Manifest.path(out, split), manifest.to_json())
    shutil.rmtree(scratch, ignore_errors=True)  # a decompressed .tar.gz, kept only for a rerun of a killed build
    _print_summary(manifest, out)
    return DAMAGED_DATA if options.strict and rejected else 0


def _refuse_other_class_lists(out: Path, split: str, classes: list[str]) -> None:
    """Labels index the class list: a split built beside another with a different list would give its labels
    other meanings (a class folder missing from val shifts every later label)."""
    for manifest_path in sorted(out.glob("*.json")) if out.is_dir() else []:
        other = manifest_path.stem
        if other == split or other.endswith(".progress"):
            continue
        try:
            theirs = Manifest.load(manifest_path).classes
        except (ValueError, TypeError, KeyError):
            continue  # not a manifest
        mismatch = class_mismatch(theirs, classes)
        if mismatch:
            raise BuildError(f"{split}'s classes differ from {manifest_path.name}'s ({mismatch}): its labels would "
                             f"mean other classes; pass --classes {manifest_path} to label it with that list")


def _print_summary(manifest: Manifest, out: Path) -> None:
    size = sum(s.bytes for s in manifest.shards) / 2**20
    print(f"{manifest.split}: {manifest.samples} kept ({len(manifest.converted)} converted to RGB JPEG), "
          f"{len(manifest.rejected)} rejected -> {len(manifest.shards)} shards, {size:.1f} MiB in {out}")
    for item in manifest.rejected[:20]:
        print(f"  rejected {item['path']}: {item['reason']}", file=sys.stderr)
    if len(manifest.rejected) > 20:
        print(f"  ... and {len(manifest.rejected) - 20} more (see {Manifest.path(out, manifest.split)})",
              file=sys.stderr)


def parse_args(argv: list[str] | None) -> BuildOptions | VerifyOptions:
    parser = argparse.ArgumentParser(prog="maeflow-shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("src", nargs="?", help="image tree SRC/<class>/<image>, a flat val folder, or an archive "
                        "(tar, .tar.gz, zip: ImageNet's train tar of class tars, the Kaggle zip...), or a folder "
                        "of per-class tars (ImageNet-21k)")
    parser.add_argument("out", nargs="?", help="output folder for shards, indexes and the manifest")
    parser.add_argument("--split", default="train", help="split name: shard prefix and manifest name")
    parser.add_argument("--val-labels", help="labels for a flat val folder: Kaggle CSV, devkit ground truth, or the "
                        "devkit .tar.gz itself")
    parser.add_argument("--unlabeled", action="store_true", help="every image under SRC at any depth, no labels "
                        "(MAE pre-training needs none)")
    parser.add_argument("--webdataset", action="store_true", help="SRC is existing WebDataset tars (a tar or a folder "
                        "of them, e.g. img2dataset's): repacked, keeping each sample's key and .txt/.json")
    parser.add_argument("--file-list", action="store_true", help="SRC is a text file: one image path per line "
                        "(relative to the file), optionally followed by an integer label")
    parser.add_argument("--synsets", help="the devkit's meta.mat, or a text file of '<ILSVRC2012_ID> <wnid>' lines "
                        "(a bare wnid list is refused: its order is not the ids')")
    parser.add_argument("--classes", help="class list to reuse (the train manifest, or one class per line)")
    parser.add_argument("--shard-size-mb", type=float, default=1024, help="target shard size in MiB")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject larger images")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any image was rejected")
    parser.add_argument("--verify", metavar="OUT", help="re-read and check the shards in OUT instead of building")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.verify:
        return VerifyOptions(Path(args.verify), args.split)
    if not (args.src and args.out):
        parser.error("SRC and OUT are required (or use --verify OUT)")
    modes = [flag for flag, on in (("--val-labels", args.val_labels), ("--unlabeled", args.unlabeled),
                                   ("--file-list", args.file_list), ("--webdataset", args.webdataset)) if on]
    if len(modes) > 1:
        parser.error(f"{modes[0]} and {modes[1]} are different inputs: pass one")
    if args.shard_size_mb <= 0 or args.workers < 1 or args.max_pixels < 1:
        parser.error("--shard-size-mb and --max-pixels must be positive and --workers at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.split):
        parser.error(f"--split {args.split!r}: a split name is letters, digits, '_' and '-' (it names files)")
    return BuildOptions(
        src=Path(args.src), out=Path(args.out), split=args.split,
        val_labels=Path(args.val_labels) if args.val_labels else None,
        synsets=Path(args.synsets) if args.synsets else None, classes=Path(args.classes) if args.classes else None,
        shard_size_mb=args.shard_size_mb, workers=args.workers, seed=args.seed, max_pixels=args.max_pixels,
        strict=args.strict, quiet=args.quiet, unlabeled=args.unlabeled, file_list=args.file_list,
        webdataset=args.webdataset,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        if isinstance(options, VerifyOptions):
            return DAMAGED_DATA if verify(options.out, options.split) else 0
        return build(options)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
