"""Fused Triton kernels for MAE's masking and loss, each beside its plain-torch reference.

The public functions dispatch per call on their `choice` (see `kernels.dispatch`): with "auto",
Triton on CUDA or under TRITON_INTERPRET=1, torch otherwise; `MAE_KERNELS=torch|triton` in the
environment overrides it.

One argument order for every op, its kernel and its reference alike: the tensor being transformed,
then the learned tensors, then the masking indices, then static options:
    visible_tokens(x, pos_embed, cls_token, ids_keep, ids_restore)
    decoder_tokens(x, mask_token, pos_embed, ids_restore)
    masked_patch_mse(pred, imgs, mask, patch_size, norm_pix)
each with a last, optional `choice` ("auto", "torch" or "triton").
"""

from kernels.decoder_tokens import decoder_tokens, decoder_tokens_reference
from kernels.masked_mse import masked_patch_mse, masked_patch_mse_reference
from kernels.visible_tokens import visible_tokens, visible_tokens_reference

__all__ = [
    "decoder_tokens",
    "decoder_tokens_reference",
    "masked_patch_mse",
    "masked_patch_mse_reference",
    "visible_tokens",
    "visible_tokens_reference",
]
