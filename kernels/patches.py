"""Patch geometry shared by the model, the loss and the reconstruction figure.

An image [N, C, H, W] becomes L = (H/p)(W/p) patches in row-major order, each a vector of p*p*C
values in (p, q, c) order (channels fastest), as the reference MAE lays them out. With norm_pix_loss
each target patch is normalized by its own mean and unbiased variance (eps 1e-6).
"""

from __future__ import annotations

import torch
from einops import rearrange

NORM_PIX_EPS = 1e-6


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C], patch vectors in (p, q, c) order."""
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]; `grid` = (rows, cols) of patches, square when omitted."""
    if grid is None:
        side = round(patches.shape[1] ** 0.5)
        if side * side != patches.shape[1]:
            raise ValueError(
                f"{patches.shape[1]} patches do not form a square grid; pass grid=(rows, cols)"
            )
        grid = (side, side)
    return rearrange(
        patches,
        "n (h w) (p q c) -> n c (h p) (w q)",
        h=grid[0],
        w=grid[1],
        p=patch_size,
        q=patch_size,
    )


def patch_mean_std(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and sqrt(unbiased variance + eps) over the last dim: norm_pix_loss's
    statistics."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return mean, (var + NORM_PIX_EPS) ** 0.5
