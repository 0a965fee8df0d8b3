"""Matmul FLOPs of MAE training (1 multiply-accumulate = 2 FLOPs; norms, softmax and GELU not
counted).

A ViT block on n tokens of width d costs n(24d^2 + 4nd): qkv and output projections 8d^2, the 4x MLP
16d^2, attention scores and mixing 4nd. Backward costs twice the forward.
"""

from __future__ import annotations

from model.mae import MaskedAutoencoderViT
from model.vit import VisionTransformer


def block_flops(tokens: int, width: int) -> int:
    """One pre-norm ViT block (qkv, attention scores and mix, proj, 4x MLP) on `tokens` tokens."""
    return tokens * (24 * width * width + 4 * tokens * width)


def mae_forward_flops(model: MaskedAutoencoderViT, mask_ratio: float = 0.75) -> int:
    """Forward FLOPs per image: patch embedding on all patches, encoder on 1+K, decoder on 1+L
    tokens."""
    length = model.num_patches
    keep = int(length * (1 - mask_ratio))
    dim, dec = model.cls_token.shape[-1], model.mask_token.shape[-1]
    patch_values = model.patch_size**2 * model.in_chans
    return (
        2 * length * patch_values * dim
        + len(model.blocks) * block_flops(1 + keep, dim)
        + 2 * (1 + keep) * dim * dec
        + len(model.decoder_blocks) * block_flops(1 + length, dec)
        + 2 * (1 + length) * dec * patch_values
    )


def mae_train_flops(model: MaskedAutoencoderViT, mask_ratio: float = 0.75) -> int:
    """Forward + backward (backward = 2 x forward) per image."""
    return 3 * mae_forward_flops(model, mask_ratio)


def classifier_train_flops(model: VisionTransformer, trains_encoder: bool = True) -> int:
    """Fine-tuning FLOPs per image: every patch through the encoder, forward and backward, and the
    head. A linear probe (`trains_encoder` False) runs the encoder forward only: no gradient flows
    into it."""
    patches, width = model.patch_embed.num_patches, model.cls_token.shape[-1]
    patch_dim = model.patch_embed.proj.weight[0].numel()
    encoder = 2 * patches * patch_dim * width + model.depth * block_flops(patches + 1, width)
    head = 2 * width * model.num_classes
    return (3 if trains_encoder else 1) * encoder + 3 * head


# Dense (no sparsity) bf16 tensor-core peaks, per card, for MFU; the first fragment a device's name
# holds wins, so the PCIe and NVL H100s come before the SXM one ("NVIDIA H100 80GB HBM3"). Cards not
# listed, and CPUs, report no MFU unless log.peak_tflops names their peak.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
    "B200": 2250e12, "B100": 1750e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a named GPU, or None (CPUs, cards not in the table): MFU is then not
    reported."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name), None)
