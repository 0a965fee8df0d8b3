"""Encoder input: the visible patches' tokens plus position embedding, behind the cls token.

out[n, 0]   = cls + pos[0]
out[n, 1+k] = x[n, ids_keep[n, k]] + pos[1 + ids_keep[n, k]]

The reference formulation adds the position embedding to all L tokens, materialises an int64
index of N*K*D with `.repeat` and gathers; the kernel reads one index per output row and writes
the result once. Backward scatters the gradient back through `ids_restore` (the keep indices are a
permutation, so every grad_x row is written exactly once, with no atomics and no zero-fill).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import KernelChoice, use_triton
from kernels.tiling import token_grid, token_tile


@triton.jit
def _visible_tokens_fwd(
    x_ptr, pos_ptr, cls_ptr, ids_keep_ptr, out_ptr, L, K, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, rows, cols, row_ok, col_ok = token_tile(K + 1, D, BLOCK_T, BLOCK_D)  # output rows, 0 = cls
    is_patch = rows > 0
    tile_ok = row_ok[:, None] & col_ok[None, :]
    patch = tl.load(ids_keep_ptr + n * K + rows - 1, mask=row_ok & is_patch, other=0).to(tl.int64)
    x = tl.load(x_ptr + (n * L + patch)[:, None] * D + cols[None, :],
                mask=tile_ok & is_patch[:, None], other=0.0)
    cls = tl.load(
        cls_ptr + cols[None, :] + 0 * rows[:, None], mask=tile_ok & ~is_patch[:, None], other=0.0
    )
    pos_row = tl.where(is_patch, patch + 1, 0)
    pos = tl.load(pos_ptr + pos_row[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
    out = x.to(tl.float32) + cls.to(tl.float32) + pos.to(tl.float32)
    tl.store(out_ptr + (n * (K + 1) + rows)[:, None] * D + cols[None, :], out, mask=tile_ok)


@triton.jit
def _visible_tokens_bwd(
    grad_out_ptr, ids_restore_ptr, grad_x_ptr, L, K, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, patches, cols, patch_ok, col_ok = token_tile(L, D, BLOCK_T, BLOCK_D)
    tile_ok = patch_ok[:, None] & col_ok[None, :]
    slot = tl.load(ids_restore_ptr + n * L + patches, mask=patch_ok, other=K).to(tl.int64)
    kept = slot < K
    grad = tl.load(grad_out_ptr + (n * (K + 1) + 1 + slot)[:, None] * D + cols[None, :],
                   mask=tile_ok & kept[:, None], other=0.0)
    tl.store(grad_x_ptr + (n * L + patches)[:, None] * D + cols[None, :], grad, mask=tile_ok)


class VisibleTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, pos_embed: Tensor, cls_token: Tensor, ids_keep: Tensor,
                ids_restore: Tensor) -> Tensor:
        x, pos_embed, cls_token = x.contiguous(), pos_embed.contiguous(), cls_token.contiguous()
        ids_keep = ids_keep.contiguous()
        n, length, width = x.shape
        keep = ids_keep.shape[1]
        out_dtype = torch.promote_types(
            torch.promote_types(x.dtype, pos_embed.dtype), cls_token.dtype
        )
        out = torch.empty(n, keep + 1, width, device=x.device, dtype=out_dtype)
        grid, tiles = token_grid(n, keep + 1, width)
        _visible_tokens_fwd[grid](
            x, pos_embed, cls_token, ids_keep, out, length, keep, width, **tiles
        )
        ctx.save_for_backward(ids_restore)
        ctx.shape, ctx.dtypes = (
            (n, length, width, keep),
            (x.dtype, pos_embed.dtype, cls_token.dtype),
        )
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (ids_restore,) = ctx.saved_tensors
        n, length, width, keep = ctx.shape
        grad_out = grad_out.contiguous()
        x_dtype, pos_dtype, cls_dtype = ctx.dtypes
        grad_x = torch.empty(n, length, width, device=grad_out.device, dtype=x_dtype)
        grid, tiles = token_grid(n, length, width)
        _visible_tokens_bwd[grid](
            grad_out, ids_restore.contiguous(), grad_x, length, keep, width, **tiles
        )
        grad_pos = grad_cls = None
        cls_rows = grad_out[:, :1].sum(0, keepdim=True, dtype=torch.float32)
        if ctx.needs_input_grad[1]:
            patch_rows = grad_x.sum(0, keepdim=True, dtype=torch.float32)
            grad_pos = torch.cat([cls_rows, patch_rows], dim=1).to(pos_dtype)
        if ctx.needs_input_grad[2]:
            grad_cls = cls_rows.to(cls_dtype)
        return grad_x, grad_pos, grad_cls, None, None


def visible_tokens_reference(
    x: torch.Tensor, pos_embed: torch.Tensor, cls_token: torch.Tensor, ids_keep: torch.Tensor,
    ids_restore: torch.Tensor,
) -> torch.Tensor:
    """The reference MAE's formulation: add pos to all tokens, repeat-index gather, prepend cls. It
    takes the kernel's arguments; only the kernel's backward needs `ids_restore` (torch's autograd
    keeps the gather)."""
    x = x + pos_embed[:, 1:, :]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
    cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)


def visible_tokens(
    x: torch.Tensor, pos_embed: torch.Tensor, cls_token: torch.Tensor, ids_keep: torch.Tensor,
    ids_restore: torch.Tensor, choice: KernelChoice = "auto",
) -> torch.Tensor:
    """[N, 1+K, D] encoder input from patch tokens x [N, L, D]; pos_embed [1, 1+L, D], cls [1, 1,
    D]."""
    if use_triton("visible_tokens", x, pos_embed, cls_token, choice=choice):
        return VisibleTokens.apply(x, pos_embed, cls_token, ids_keep, ids_restore)
    return visible_tokens_reference(x, pos_embed, cls_token, ids_keep, ids_restore)
