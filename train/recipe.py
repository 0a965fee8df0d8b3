"""The paper's optimisation recipe (He et al. 2021, appendix A.1): AdamW without weight decay on biases
and 1-D parameters, lr = blr x global batch / 256, linear warm-up then half-cycle cosine, set every
iteration."""

from __future__ import annotations

import math

import torch

from train.config import OptimConfig


def peak_lr(optim: OptimConfig, global_batch_size: int) -> float:
    """optim.lr when set, else the linear scaling rule blr x global batch / 256."""
    return optim.lr or optim.blr * global_batch_size / 256


def lr_at(progress_epochs: float, peak: float, optim: OptimConfig) -> float:
    """Linear warm-up from 0, then half-cycle cosine to min_lr (the paper's per-iteration schedule)."""
    if progress_epochs < optim.warmup_epochs:
        return peak * progress_epochs / optim.warmup_epochs
    done = (progress_epochs - optim.warmup_epochs) / (optim.epochs - optim.warmup_epochs)
    return optim.min_lr + (peak - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on 1-D parameters (norms) and biases; frozen position embeddings left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, peak: float) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel for every parameter's update) over the recipe's groups. DeepSpeed
    wraps it: under ZeRO it steps this rank's partition, in bf16 mode the fp32 master copies."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=peak, betas=optim.betas, eps=1e-8,
                             fused=True)
