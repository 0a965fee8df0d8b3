"""What every stage needs to know about the run: device, quick mode, where to keep bench data."""

from __future__ import annotations

import importlib.util
import io
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.formats import VERSIONS
from pipeline.sample_data import class_name, synthetic_photo, write_split
from pipeline.storage import Location

# The shard builder is imported where shards are built: it needs braceexpand, which a GPU machine
# with only torch and triton lacks, and the kernel and model stages must still run there.

IMAGENET_SIZE = (500, 375)  # the typical ImageNet train JPEG: ~500x375, ~110 KB


def imagenet_like_jpeg(index: int) -> bytes:
    """One deterministic photo-like JPEG; see `BenchContext.imagenet_like_tree`."""
    rng = np.random.default_rng([index, 7])
    kind = index % 10
    size = (160, 120) if kind == 0 else (1024, 768) if kind == 1 else IMAGENET_SIZE
    if rng.random() < 0.25:
        size = size[::-1]  # portrait
    img = synthetic_photo(index % 10, index, 7).resize(size, Image.BICUBIC)
    pixels = np.asarray(img).astype(np.int16) + rng.normal(0, 16, (size[1], size[0], 3)).astype(
        np.int16
    )
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


class StageUnavailable(RuntimeError):
    """This machine lacks what the stage measures (DALI, DeepSpeed); the run goes on without it."""


def require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise StageUnavailable(f"not installed here: {', '.join(missing)}")


@dataclass(frozen=True)
class BenchContext:
    device: str  # "cpu" or "gpu"
    quick: bool
    work: Path  # cached bench data (image trees and shards)
    data: Location | None = None  # the user's shards, for `bench pipeline --data`
    local_batch_size: int | None = None  # for `--data`; default 256 on a GPU, 32 on a CPU
    preset: str = "vit_b16_1600ep"  # whose training speed `--data` is held against

    @property
    def torch_device(self) -> str:
        return "cuda" if self.device == "gpu" else "cpu"

    def sample_tree(self) -> Path:
        """The built-in sample data (8 classes x 24 images, 200-500 px)."""
        root = self.work / "sample"
        if not (root / "train").is_dir():
            write_split(root / "train", 8, 24, 0)
        return root / "train"

    def imagenet_like_tree(self, count: int) -> Path:
        """`count` JPEGs shaped like ImageNet's train set: mostly ~500x375 (either orientation), a
        tenth small and a tenth large, noisy enough to average ~110 KB, as real photographs do."""
        root = self.work / f"imagenet_like_{count}"
        done = root / ".done"
        if not done.is_file():
            with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
                for i, data in enumerate(pool.imap(imagenet_like_jpeg, range(count), chunksize=16)):
                    folder = root / class_name(i % 10)
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{i}.JPEG").write_bytes(data)
            done.touch()
        return root

    def shards_of(self, tree: Path, workers: int = 2, shard_size_mb: int = 64) -> Path:
        from pipeline.build_shards import main as build_shards

        # named by the manifest's format too: a cache from a maeflow that wrote another is not read
        out = tree.parent / f"{tree.name}_shards{shard_size_mb}mb_manifest{VERSIONS['manifest']}"
        if not (out / "train.json").is_file():
            code = build_shards([str(tree), str(out), "--shard-size-mb", str(shard_size_mb),
                                 "--workers", str(workers), "--quiet"])
            if code:
                raise RuntimeError(f"building bench shards from {tree} failed")
        return out
