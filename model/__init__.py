"""MAE ViT models whose state dicts match the reference implementation's."""

from model.checkpoint import LoadReport, load_reference_checkpoint, read_state_dict
from model.mae import MaskedAutoencoderViT, patchify, random_masking, unpatchify
from model.presets import (
    PRESETS,
    build_mae,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch16,
)

__all__ = [
    "PRESETS",
    "LoadReport",
    "MaskedAutoencoderViT",
    "build_mae",
    "load_reference_checkpoint",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_tiny_patch16",
    "patchify",
    "random_masking",
    "read_state_dict",
    "unpatchify",
]
