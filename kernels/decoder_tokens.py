"""Decoder input: visible tokens back in patch order, the mask token in every removed slot.

out[n, 0]   = x[n, 0] + pos[0]
out[n, 1+l] = (x[n, 1 + r] if r < K else mask_token) + pos[1 + l],   r = ids_restore[n, l]

The reference formulation concatenates N*(L-K) mask-token copies, builds an int64 index of
N*L*Dd with `.repeat`, gathers, concatenates the cls row back and adds the position embedding:
four passes. The kernel writes each output row once. Backward scatters the visible rows' gradients
(a permutation: no atomics) and reduces the mask token's gradient per tile, then over tiles in
torch.
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
def _decoder_tokens_fwd(
    x_ptr, mask_token_ptr, ids_restore_ptr, pos_ptr, out_ptr, L, K, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, rows, cols, row_ok, col_ok = token_tile(L + 1, D, BLOCK_T, BLOCK_D)  # output rows, 0 = cls
    tile_ok = row_ok[:, None] & col_ok[None, :]
    slot = tl.load(ids_restore_ptr + n * L + rows - 1, mask=row_ok & (rows > 0), other=-1).to(
        tl.int64
    )
    visible = slot < K  # the cls row (slot -1) reads x[n, 0]
    x = tl.load(x_ptr + (n * (K + 1) + 1 + slot)[:, None] * D + cols[None, :],
                mask=tile_ok & visible[:, None], other=0.0)
    token = tl.load(
        mask_token_ptr + cols[None, :] + 0 * rows[:, None],
        mask=tile_ok & ~visible[:, None],
        other=0.0,
    )
    pos = tl.load(pos_ptr + rows[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
    out = x.to(tl.float32) + token.to(tl.float32) + pos.to(tl.float32)
    tl.store(out_ptr + (n * (L + 1) + rows)[:, None] * D + cols[None, :], out, mask=tile_ok)


@triton.jit
def _decoder_tokens_bwd(
    grad_out_ptr, ids_restore_ptr, grad_x_ptr, grad_token_partial_ptr, L, K, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n, rows, cols, row_ok, col_ok = token_tile(L + 1, D, BLOCK_T, BLOCK_D)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    slot = tl.load(ids_restore_ptr + n * L + rows - 1, mask=row_ok & (rows > 0), other=-1).to(
        tl.int64
    )
    visible = slot < K
    grad = tl.load(
        grad_out_ptr + (n * (L + 1) + rows)[:, None] * D + cols[None, :], mask=tile_ok, other=0.0
    )
    tl.store(grad_x_ptr + (n * (K + 1) + 1 + slot)[:, None] * D + cols[None, :], grad,
             mask=tile_ok & visible[:, None])
    token_grad = tl.sum(tl.where(visible[:, None], 0.0, grad.to(tl.float32)), axis=0)
    partial_row = n * tl.num_programs(1) + tl.program_id(1)
    tl.store(grad_token_partial_ptr + partial_row * D + cols, token_grad, mask=col_ok)


class DecoderTokens(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, mask_token: Tensor, pos_embed: Tensor, ids_restore: Tensor
    ) -> Tensor:
        x, mask_token, pos_embed = x.contiguous(), mask_token.contiguous(), pos_embed.contiguous()
        ids_restore = ids_restore.contiguous()
        n, length = ids_restore.shape
        keep, width = x.shape[1] - 1, x.shape[2]
        out_dtype = torch.promote_types(
            torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype
        )
        out = torch.empty(n, length + 1, width, device=x.device, dtype=out_dtype)
        grid, tiles = token_grid(n, length + 1, width)
        _decoder_tokens_fwd[grid](
            x, mask_token, ids_restore, pos_embed, out, length, keep, width, **tiles
        )
        ctx.save_for_backward(ids_restore)
        ctx.dtypes = (x.dtype, mask_token.dtype, pos_embed.dtype)
        ctx.keep = keep
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (ids_restore,) = ctx.saved_tensors
        x_dtype, token_dtype, pos_dtype = ctx.dtypes
        n, length = ids_restore.shape
        keep, width = ctx.keep, grad_out.shape[2]
        grad_out = grad_out.contiguous()
        grid, tiles = token_grid(n, length + 1, width)
        grad_x = torch.empty(n, keep + 1, width, device=grad_out.device, dtype=x_dtype)
        partial = torch.empty(n, grid[1], width, device=grad_out.device, dtype=torch.float32)
        _decoder_tokens_bwd[grid](
            grad_out, ids_restore, grad_x, partial, length, keep, width, **tiles
        )
        grad_token = (
            partial.sum((0, 1)).view(1, 1, width).to(token_dtype)
            if ctx.needs_input_grad[1]
            else None
        )
        grad_pos = (
            grad_out.sum(0, keepdim=True, dtype=torch.float32).to(pos_dtype)
            if ctx.needs_input_grad[2]
            else None
        )
        return grad_x, grad_token, grad_pos, None


def decoder_tokens_reference(
    x: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor, ids_restore: torch.Tensor
) -> torch.Tensor:
    """The reference MAE's formulation: append mask tokens, repeat-index unshuffle, re-attach cls,
    add pos."""
    n, length = ids_restore.shape
    mask_tokens = mask_token.repeat(n, length + 1 - x.shape[1], 1)
    shuffled = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    unshuffled = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    return torch.cat([x[:, :1, :], unshuffled], dim=1) + pos_embed


def decoder_tokens(
    x: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor, ids_restore: torch.Tensor,
    choice: KernelChoice = "auto",
) -> torch.Tensor:
    """[N, 1+L, Dd] decoder input from x [N, 1+K, Dd]; mask_token [1, 1, Dd], pos_embed [1, 1+L,
    Dd]."""
    if use_triton("decoder_tokens", x, mask_token, pos_embed, choice=choice):
        return DecoderTokens.apply(x, mask_token, pos_embed, ids_restore)
    return decoder_tokens_reference(x, mask_token, pos_embed, ids_restore)
