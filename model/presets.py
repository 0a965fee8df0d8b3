"""The paper's model sizes (He et al. 2021, Table 1 and appendix A.1: ViT-B/16, L/16, H/14 with a
512-d, 8-block decoder) and a tiny one for tests and the CPU demo."""

from __future__ import annotations

from typing import Any

from model.mae import MaskedAutoencoderViT

_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

PRESETS: dict[str, dict[str, Any]] = {
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DECODER),
    "mae_vit_large_patch16": dict(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DECODER
    ),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DECODER),
    "mae_vit_tiny_patch16": dict(
        patch_size=16,
        embed_dim=192,
        depth=4,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
}


def build_mae(name: str, **overrides: Any) -> MaskedAutoencoderViT:
    """Build a preset by name; keywords (img_size, norm_pix_loss, ...) override the preset's."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    return MaskedAutoencoderViT(**{**PRESETS[name], **overrides})


def mae_vit_base_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder (86M parameters) with the 512-d, 8-block decoder."""
    return build_mae("mae_vit_base_patch16", **kwargs)


def mae_vit_large_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder (304M parameters) with the 512-d, 8-block decoder."""
    return build_mae("mae_vit_large_patch16", **kwargs)


def mae_vit_huge_patch14(**kwargs: Any) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder (632M parameters) with the 512-d, 8-block decoder."""
    return build_mae("mae_vit_huge_patch14", **kwargs)


def mae_vit_tiny_patch16(**kwargs: Any) -> MaskedAutoencoderViT:
    """A 192-d, 4-block toy for tests and the CPU demo (not a paper model)."""
    return build_mae("mae_vit_tiny_patch16", **kwargs)
