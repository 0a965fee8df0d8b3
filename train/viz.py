"""The paper's reconstruction figure: original | masked | reconstruction | reconstruction +
visible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model import MaskedAutoencoderViT
from pipeline import IMAGENET_MEAN, IMAGENET_STD, build_loader
from pipeline.atomic import atomic_path

RECONSTRUCTION = "reconstruction_step"  # viz/reconstruction_step00001200.png
MIN_CELL = 128  # small images are enlarged (nearest) so patches stay visible
TITLE_BAND = 14  # pixels above the columns for their titles
COLUMN_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")


def fixed_images(shards: str, split: str, count: int, img_size: int, device: torch.device,
                 synthetic: bool = False) -> torch.Tensor:
    """The first `count` samples of `split` (or of train, if the split is absent), centre-cropped;
    or, for a run on synthetic data, `count` fixed random images."""
    if synthetic:
        loader = build_loader(
            None,
            backend="synthetic",
            train=False,
            local_batch_size=count,
            img_size=img_size,
            device="gpu" if device.type == "cuda" else "cpu",
            synthetic_samples=count,
        )
        return next(iter(loader))[0]
    for candidate in (split, "train"):
        try:
            loader = build_loader(
                shards,
                split=candidate,
                local_batch_size=count,
                img_size=img_size,
                train=False,
                device="gpu" if device.type == "cuda" else "cpu",
                backend="pil",
                num_threads=1,
            )
        except FileNotFoundError:
            continue
        images, _ = next(iter(loader))
        return images
    raise FileNotFoundError(f"no {split} or train shards in {shards} for reconstruction images")


def fixed_noise(count: int, num_patches: int, device: torch.device) -> torch.Tensor:
    return torch.rand(count, num_patches, generator=torch.Generator().manual_seed(0)).to(device)


def reconstruction_grid(model: MaskedAutoencoderViT, images: torch.Tensor, pred: torch.Tensor,
                        mask: torch.Tensor) -> Image.Image:
    recon = model.prediction_pixels(images, pred)
    p = model.patch_size
    pixel_mask = model.unpatchify(mask.float().unsqueeze(-1).repeat(1, 1, p * p * model.in_chans))
    images = images.float()
    columns = [
        images,
        images * (1 - pixel_mask),
        recon,
        images * (1 - pixel_mask) + recon * pixel_mask,
    ]
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    rows = torch.cat([(c * std + mean).clamp(0, 1) for c in columns], dim=3)  # N, 3, H, 4W
    grid = torch.cat(list(rows), dim=1)  # 3, N*H, 4W
    pixels = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels, "RGB")
    scale = max(1, MIN_CELL // images.shape[-1])
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return with_column_titles(picture, images.shape[-1] * scale)


def with_column_titles(picture: Image.Image, cell: int) -> Image.Image:
    """The grid under a white band naming each column, as the reference's notebook titles its
    figure."""
    titled = Image.new("RGB", (picture.width, picture.height + TITLE_BAND), "white")
    titled.paste(picture, (0, TITLE_BAND))
    draw = ImageDraw.Draw(titled)
    for column, title in enumerate(COLUMN_TITLES):
        draw.text((column * cell + 3, 1), title, fill="black")
    return titled


def reconstructions_after(out_dir: Path, step: int) -> list[Path]:
    """The reconstruction images in `out_dir` of steps after `step`."""
    images = sorted(out_dir.glob(f"{RECONSTRUCTION}*.png"))
    return [p for p in images if int(p.stem.removeprefix(RECONSTRUCTION)) > step]


def save_reconstruction(picture: Image.Image, out_dir: Path, step: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{RECONSTRUCTION}{step:08d}.png"
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
