"""Masked Autoencoder with a Vision Transformer backbone (He et al., 2021, arXiv 2111.06377).

Read top to bottom: patchify -> random masking -> encoder on visible patches only -> light decoder
on all patches (mask tokens fill the removed slots) -> pixel loss on the removed patches only.
Parameter names and shapes follow the reference implementation, so its checkpoints load as-is.
The three data-movement steps (visible-token gather, unshuffle with mask tokens, masked loss)
go through `kernels`, which picks fused Triton kernels or their plain-torch references.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import kernels
from kernels.dispatch import KernelChoice
from kernels.patches import patch_mean_std, patchify, unpatchify
from model.hooks import TransformerHooks
from model.pos_embed import sincos_2d


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def random_masking(
    noise: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample shuffle by `argsort(noise)`; the lowest-noise `int(L * (1 - ratio))` patches stay.

    Returns ids_keep [N, K], ids_restore [N, L] (slot of each patch in the shuffled order) and
    mask [N, L] in the original patch order, 1 = removed, 0 = kept.
    """
    _n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= len_keep).to(noise.dtype)
    return ids_shuffle[:, :len_keep], ids_restore, mask


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as one stride-p convolution."""

    def __init__(
        self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(
            self.qkv(x), "n t (three h d) -> three n h t d", three=3, h=self.num_heads
        )
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "n h t d -> n t (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path_scales(
    rates: torch.Tensor, samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stochastic depth's per-sample factors for residual branches of drop rates `rates`:
    [*rates.shape, samples], 0 for a dropped sample (a fraction `rate` of them) and 1 / (1 - rate)
    for the others, so that a branch's expected value is unchanged. `generator`: the draws' stream,
    on the rates' device (None: torch's global one)."""
    keep = (1 - rates).unsqueeze(-1)
    draws = torch.rand(
        (*rates.shape, samples), generator=generator, device=rates.device, dtype=rates.dtype
    )
    return (draws < keep).to(rates.dtype) / keep


class Block(nn.Module):
    """Pre-norm transformer block (the timm ViT layout the reference checkpoints use).
    `drop_path_rate` is fine-tuning's stochastic depth (pre-training uses none): the model draws its
    factors for every block before the blocks run (`drop_path_scales`), so that recomputing a block
    for its gradient, or compiling it, sees the same draws as a tensor input."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        norm_layer: Callable[[int], nn.Module],
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, drop_scales: torch.Tensor | None = None) -> torch.Tensor:
        """`drop_scales` [2, N, 1, 1]: the attention branch's and the MLP branch's per-sample
        factors, or None."""
        attn = self.attn(self.norm1(x))
        x = x + (attn if drop_scales is None else attn * drop_scales[0])
        mlp = self.mlp(self.norm2(x))
        return x + (mlp if drop_scales is None else mlp * drop_scales[1])


class MaskedAutoencoderViT(TransformerHooks):
    """MAE with a ViT encoder and a narrow ViT decoder; keywords match the reference constructor."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        if any(side % patch_size for side in self.img_size):
            raise ValueError(
                f"image size {self.img_size} is not divisible by patch size {patch_size}"
            )
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        # masking and loss: Triton where it runs, else the torch references
        self.kernels: KernelChoice = "auto"

        # Encoder: patch embedding, fixed position embedding, ViT blocks on visible tokens only.
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # Decoder: narrow transformer over all patches, predicting the pixels of each one.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        self.initialize_weights()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def compile_targets(self) -> list[nn.Module]:
        return [*self.blocks, *self.decoder_blocks]

    def initialize_weights(self) -> None:
        """The paper's init: xavier-uniform linears (and patch conv as a linear), N(0, 0.02)
        tokens."""
        grid = self.patch_embed.grid
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], *grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_2d(self.decoder_pos_embed.shape[-1], *grid).unsqueeze(0)
        )
        proj = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.patch_size, self.patch_embed.grid)

    def prediction_pixels(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predictions as images [N, C, H, W]: with norm_pix_loss, each patch takes the mean and
        spread of the image patch it replaces, since the model predicts normalized pixels."""
        pred = pred.float()
        if self.norm_pix_loss:
            mean, std = patch_mean_std(self.patchify(imgs.float()))
            pred = pred * std + mean
        return self.unpatchify(pred)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches; returns latent [N, 1+K, D], mask [N, L], ids_restore [N,
        L]."""
        self._check_inputs(imgs, mask_ratio, noise)
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.num_patches, device=imgs.device)
        ids_keep, ids_restore, mask = random_masking(noise, mask_ratio)

        x = self.patch_embed(imgs)
        x = kernels.visible_tokens(
            x, self.pos_embed, self.cls_token, ids_keep, ids_restore, self.kernels
        )
        return self._transform(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch, unmasked and in order: [N, 1+L, D], cls token first (for
        evaluation)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return self._transform(torch.cat([cls, x], dim=1))

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's blocks and final norm."""
        return self.norm(self.run_encoder_blocks(x))

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch's pixels from the latent; returns [N, L, p*p*C]."""
        x = self.decoder_embed(latent)
        x = kernels.decoder_tokens(
            x, self.mask_token, self.decoder_pos_embed, ids_restore, self.kernels
        )
        for block in self.decoder_blocks:
            x = self.run_block(block, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error over the removed patches only (per-patch normalized targets if
        norm_pix_loss)."""
        return kernels.masked_patch_mse(
            pred, imgs, mask, self.patch_size, self.norm_pix_loss, self.kernels
        )

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def _check_inputs(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None
    ) -> None:
        expected = (self.in_chans, *self.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape [N, {', '.join(map(str, expected))}], got "
                f"{list(imgs.shape)}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if int(self.num_patches * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no patch out of {self.num_patches}")
        if noise is not None and tuple(noise.shape) != (imgs.shape[0], self.num_patches):
            raise ValueError(
                f"expected noise of shape [{imgs.shape[0]}, {self.num_patches}] (one value per "
                f"patch), got {list(noise.shape)}"
            )
