"""What every stage needs to know about the run: device, quick mode, where to keep bench data."""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.sample_data import class_name, synthetic_photo, write_split

# The shard builder is imported where shards are built: it needs braceexpand, which a GPU machine
# with only torch and triton lacks, and the kernel and model stages must still run there.

IMAGENET_SIZE = (500, 375)  # the typical ImageNet train JPEG: ~500x375, ~110 KB


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
        """`count` ImageNet-sized JPEGs (500x375, quality 95) for the GPU decoding benchmark."""
        root = self.work / f"imagenet_like_{count}"
        done = root / ".done"
        if not done.is_file():
            for i in range(count):
                folder = root / class_name(i % 10)
                folder.mkdir(parents=True, exist_ok=True)
                img = synthetic_photo(i % 10, i, 7).resize(IMAGENET_SIZE, Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=95)
                (folder / f"{i}.JPEG").write_bytes(buf.getvalue())
            done.touch()
        return root

    def shards_of(self, tree: Path, workers: int = 2) -> Path:
        from pipeline.build_shards import main as build_shards

        out = tree.parent / f"{tree.name}_shards"
        if not (out / "train.json").is_file():
            code = build_shards([str(tree), str(out), "--shard-size-mb", "64", "--workers", str(workers), "--quiet"])
            if code:
                raise RuntimeError(f"building bench shards from {tree} failed")
        return out
