"""Built-in sample data: deterministic synthetic photographs in an ImageNet-style class-folder tree.

    python -m pipeline.sample_data OUT [--classes 8] [--train-per-class 24] [--val-per-class 4]

writes OUT/train/<wnid>/<wnid>_<i>.JPEG and OUT/val/<wnid>/... Each class has its own palette and
shape family over a textured background, at ImageNet-like sizes, so that a model can learn
something and the decoders see realistic JPEGs. Nothing is downloaded; same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def class_name(index: int) -> str:
    return f"n{90000000 + index:08d}"  # wnid-shaped, outside WordNet's real range


def synthetic_photo(class_index: int, image_index: int, split_offset: int) -> Image.Image:
    """One image: a class-coloured gradient with noise texture and a few class-shaped objects."""
    rng = np.random.default_rng([class_index, image_index, split_offset])
    width, height = int(rng.integers(200, 500)), int(rng.integers(160, 375))
    hue = np.array(
        [(class_index * 97) % 256, (class_index * 53 + 80) % 256, (class_index * 151 + 40) % 256]
    )
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = (xs / width * rng.uniform(0.3, 1.0) + ys / height * rng.uniform(0.3, 1.0))[..., None]
    noise = rng.normal(0, 12, size=(height, width, 3))
    pixels = np.clip(hue * (0.4 + 0.6 * ramp / ramp.max()) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        size = int(rng.integers(30, max(31, min(width, height) // 2)))
        color = tuple(int(c) for c in (255 - hue + rng.integers(-30, 30, 3)) % 256)
        box = [x0, y0, x0 + size, y0 + int(size * rng.uniform(0.6, 1.4))]
        shape = class_index % 3
        if shape == 0:
            draw.ellipse(box, fill=color)
        elif shape == 1:
            draw.rectangle(box, fill=color)
        else:
            draw.polygon(
                [(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=color
            )
    return img.filter(ImageFilter.GaussianBlur(radius=0.8))


def write_split(root: Path, classes: int, per_class: int, split_offset: int) -> int:
    for c in range(classes):
        folder = root / class_name(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            buf = io.BytesIO()
            # A few progressive JPEGs, as real ImageNet has.
            synthetic_photo(c, i, split_offset).save(
                buf, "JPEG", quality=90, progressive=(i % 5 == 4)
            )
            (folder / f"{class_name(c)}_{i}.JPEG").write_bytes(buf.getvalue())
    return classes * per_class


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to create train/ and val/ in")
    parser.add_argument("--classes", type=int, default=8, help="number of classes")
    parser.add_argument("--train-per-class", type=int, default=24, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=4, help="validation images per class")
    args = parser.parse_args(argv)
    out = Path(args.out)
    n_train = write_split(out / "train", args.classes, args.train_per_class, 0)
    n_val = write_split(out / "val", args.classes, args.val_per_class, 1)
    print(
        f"sample data: {n_train} train and {n_val} val images in {args.classes} classes under {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
