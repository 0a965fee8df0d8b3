"""Fixed 2-D sine-cosine position embeddings (MAE paper, appendix A.1; as in MoCo v3)."""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim] embedding: first half sin, second half cos, omega_k =
    1/10000^(k/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """[(1 +) grid_h*grid_w, dim] embedding of a row-major patch grid.

    The first half of the channels encodes the column index and the second half the row index,
    which is the layout the reference checkpoints were trained with. The cls slot is all zeros.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat(
        [sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resize_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """[1, 1 + h*w, D] -> [1, 1 + grid_h*grid_w, D]: the patch grid resampled bicubically, the cls
    slot kept (fine-tuning at another resolution than pre-training, e.g. ViT-H/14 at 448)."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    side = round(grid.shape[1] ** 0.5)
    if side * side != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} patches is not a square grid")
    if (side, side) == (grid_h, grid_w):
        return pos_embed
    image = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    image = torch.nn.functional.interpolate(
        image, size=(grid_h, grid_w), mode="bicubic", align_corners=False
    )
    return torch.cat([cls, image.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)], dim=1)
