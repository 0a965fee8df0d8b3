"""Small image trees for shard-builder tests, with every kind of bad input a real dataset has."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(width: int, height: int, seed: int, mode: str = "RGB", **save) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, **save)
    return buf.getvalue()


def png_bytes(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(
        np.random.default_rng(seed).integers(0, 255, (height, width, 4), dtype=np.uint8), "RGBA"
    ).save(buf, "PNG")
    return buf.getvalue()


GOOD = {  # class -> {file name: bytes}
    "n01000001": {
        f"a_{i}.JPEG": jpeg_bytes(64 + 8 * i, 48 + 4 * i, seed=i, progressive=(i % 2 == 1))
        for i in range(6)
    },
    "n01000002": {f"b_{i}.JPEG": jpeg_bytes(40, 72, seed=100 + i) for i in range(5)},
    "n01000003": {f"c_{i}.JPEG": jpeg_bytes(56, 56, seed=200 + i, mode="L") for i in range(4)},
}
CONVERTED = {  # (class, name): bytes that must be converted to RGB JPEG and kept
    ("n01000001", "cmyk.JPEG"): jpeg_bytes(50, 40, seed=7, mode="CMYK"),
    ("n01000002", "really_a_png.JPEG"): png_bytes(30, 20, seed=8),
}


def bad_files() -> dict[tuple[str, str], bytes]:
    """(class, name) -> bytes that must be rejected, and why (in the test)."""
    truncated = jpeg_bytes(120, 90, seed=9)
    return {
        ("n01000001", "empty.JPEG"): b"",
        ("n01000002", "truncated.JPEG"): truncated[: len(truncated) // 2],
        ("n01000003", "notes.txt"): b"not an image at all\n",
        ("n01000003", "huge.JPEG"): jpeg_bytes(400, 300, seed=10),  # over the test's --max-pixels
    }


MAX_PIXELS = 100_000


def write_tree(root: Path) -> dict[str, int]:
    """Writes the tree; returns relative path -> expected label for every image that must be
    kept."""
    classes = sorted(GOOD)
    expected = {}
    for cls, files in GOOD.items():
        for name, data in files.items():
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / name).write_bytes(data)
            expected[f"{cls}/{name}"] = classes.index(cls)
    for (cls, name), data in CONVERTED.items():
        (root / cls / name).write_bytes(data)
        expected[f"{cls}/{name}"] = classes.index(cls)
    for (cls, name), data in bad_files().items():
        (root / cls / name).write_bytes(data)
    return expected
