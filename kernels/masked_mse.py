"""MAE's loss in one pass: masked-only MSE against (optionally per-patch normalized) pixels.

loss = sum_{n,l} mask[n,l] * mean_j (pred[n,l,j] - target[n,l,j])^2 / sum mask,
target = patchify(imgs) in (p, q, c) order, normalized per patch with the unbiased variance
and eps 1e-6 when `norm_pix`. The reference formulation copies the image into patches, takes
mean and variance, normalizes, squares, averages and masks: about six passes. Here one program per
patch reads its pixels straight from the image, skips unmasked patches without touching memory,
and accumulates in float32; backward recomputes the target rather than storing it.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import KernelChoice, use_triton
from kernels.patches import NORM_PIX_EPS, patch_mean_std, patchify

MAX_PATCH_VALUES = 16384  # one program holds a whole patch in registers


@triton.jit
def _patch_error(
    img_ptr, pred_ptr, pid, C, H, W, grid_w, L, P, stride_pn, stride_pl, eps,
    PATCH: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    """(pred - target) for patch `pid` in image order (c, i, j), and each value's offset inside a
    pred row."""
    n = pid // L
    patch = pid % L
    offs = tl.arange(0, BLOCK)
    c = offs // (PATCH * PATCH)
    i = (offs // PATCH) % PATCH
    j = offs % PATCH
    valid = offs < P
    row = (patch // grid_w) * PATCH + i
    col = (patch % grid_w) * PATCH + j
    target = tl.load(img_ptr + ((n * C + c) * H + row) * W + col, mask=valid, other=0.0).to(
        tl.float32
    )
    inner = (i * PATCH + j) * C + c  # pred rows are in (p, q, c) order
    pred = tl.load(pred_ptr + n * stride_pn + patch * stride_pl + inner, mask=valid, other=0.0).to(
        tl.float32
    )
    if NORM:
        mean = tl.sum(target, axis=0) / P
        centered = tl.where(valid, target - mean, 0.0)
        var = tl.sum(centered * centered, axis=0) / (P - 1)
        target = centered / tl.sqrt(var + eps)
    return tl.where(valid, pred - target, 0.0), inner, valid


@triton.jit
def _masked_mse_fwd(
    img_ptr, pred_ptr, mask_ptr, loss_ptr, C, H, W, grid_w, L, P, stride_pn, stride_pl, eps,
    PATCH: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    weight = tl.load(mask_ptr + pid).to(tl.float32)
    loss = 0.0
    if weight != 0.0:
        err, _, _ = _patch_error(
            img_ptr,
            pred_ptr,
            pid,
            C,
            H,
            W,
            grid_w,
            L,
            P,
            stride_pn,
            stride_pl,
            eps,
            PATCH,
            NORM,
            BLOCK,
        )
        loss = tl.sum(err * err, axis=0) / P * weight
    tl.store(loss_ptr + pid, loss)


@triton.jit
def _masked_mse_bwd(
    img_ptr,
    pred_ptr,
    mask_ptr,
    scale_ptr,
    grad_ptr,
    C,
    H,
    W,
    grid_w,
    L,
    P,
    stride_pn,
    stride_pl,
    eps,
    PATCH: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    weight = tl.load(mask_ptr + pid).to(tl.float32)
    if weight != 0.0:
        err, inner, valid = _patch_error(img_ptr, pred_ptr, pid, C, H, W, grid_w, L, P, stride_pn,
                                             stride_pl, eps, PATCH, NORM, BLOCK)
        scale = tl.load(scale_ptr).to(tl.float32)  # d(loss)/d(out) / sum(mask), kept on the device
        grad = err * (2.0 * weight * scale / P)
        tl.store(grad_ptr + pid * P + inner, grad, mask=valid)
    else:
        offs = tl.arange(0, BLOCK)
        tl.store(grad_ptr + pid * P + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < P)


def _launch_args(imgs: Tensor, pred: Tensor, patch_size: int, norm_pix: bool) -> tuple[tuple, dict]:
    _n, chans, height, width = imgs.shape
    grid_w = width // patch_size
    values = patch_size * patch_size * chans
    meta = dict(PATCH=patch_size, NORM=norm_pix, BLOCK=triton.next_power_of_2(values))
    args = (
        chans,
        height,
        width,
        grid_w,
        pred.shape[1],
        values,
        pred.stride(0),
        pred.stride(1),
        NORM_PIX_EPS,
    )
    return args, meta


class MaskedPatchMSE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool
    ) -> Tensor:
        imgs, mask = imgs.contiguous(), mask.contiguous()
        if pred.stride(2) != 1:
            pred = pred.contiguous()
        args, meta = _launch_args(imgs, pred, patch_size, norm_pix)
        per_patch = torch.empty(mask.shape, device=pred.device, dtype=torch.float32)
        _masked_mse_fwd[(mask.numel(),)](imgs, pred, mask, per_patch, *args, **meta)
        mask_sum = mask.sum(dtype=torch.float32)
        ctx.save_for_backward(imgs, pred, mask, mask_sum)
        ctx.patch_size, ctx.norm_pix = patch_size, norm_pix
        return per_patch.sum() / mask_sum

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        imgs, pred, mask, mask_sum = ctx.saved_tensors
        args, meta = _launch_args(imgs, pred, ctx.patch_size, ctx.norm_pix)
        scale = (grad_loss.float() / mask_sum).reshape(1)
        grad_pred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
        _masked_mse_bwd[(mask.numel(),)](imgs, pred, mask, scale, grad_pred, *args, **meta)
        return grad_pred, None, None, None, None


def masked_patch_mse_reference(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool
) -> torch.Tensor:
    """The reference MAE's formulation, op by op."""
    target = patchify(imgs, patch_size)
    if norm_pix:
        mean, std = patch_mean_std(target)
        target = (target - mean) / std
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def masked_patch_mse(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
    choice: KernelChoice = "auto",
) -> torch.Tensor:
    """Scalar loss from pred [N, L, p*p*C], imgs [N, C, H, W] and mask [N, L] (1 = removed)."""
    values = patch_size * patch_size * imgs.shape[1]
    too_big = None
    if values > MAX_PATCH_VALUES:
        too_big = f"a patch of {values} values exceeds the kernel's {MAX_PATCH_VALUES}"
    if use_triton("masked_patch_mse", imgs, pred, mask, choice=choice, unsupported=too_big):
        return MaskedPatchMSE.apply(pred, imgs, mask, patch_size, norm_pix)
    return masked_patch_mse_reference(pred, imgs, mask, patch_size, norm_pix)
