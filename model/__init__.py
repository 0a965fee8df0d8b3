"""MAE ViT models whose state dicts match the reference implementation's."""

from kernels.dispatch import KernelChoice, effective_choice, runs_on, triton_failure
from kernels.patches import patchify, unpatchify
from model.mae import MaskedAutoencoderViT, random_masking
from model.presets import (
    PRESETS,
    build_mae,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch16,
)
from model.weights import LoadReport, load_reference_weights, read_weights

__all__ = [
    "PRESETS",
    "KernelChoice",
    "LoadReport",
    "MaskedAutoencoderViT",
    "build_mae",
    "effective_choice",
    "load_reference_weights",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_tiny_patch16",
    "patchify",
    "random_masking",
    "read_weights",
    "runs_on",
    "triton_failure",
    "unpatchify",
]
