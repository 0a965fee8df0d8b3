"""The pre-trained encoder as an image classifier: the paper's end-to-end fine-tuning and
linear-probe models (He et al. 2021, appendix A.2 and A.3).

Fine-tuning: every patch through the encoder (with stochastic depth), the patch tokens averaged
(global pooling), a LayerNorm (`fc_norm`), then the linear head. Linear probe: the frozen encoder's
class token after its final norm, a BatchNorm without affine parameters, then the linear head
(`head.0`, `head.1`). Parameter names follow the reference fine-tuning code, so its checkpoints and
ours load into each other.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from model.hooks import TransformerHooks
from model.mae import Block, PatchEmbed, _pair, drop_path_scales
from model.pos_embed import resize_pos_embed, sincos_2d
from model.presets import PRESETS
from model.weights import WeightsError

# What a pre-trained MAE lacks that a classifier has: the head, and the norm before it with global
# pooling.
HEAD_KEYS = ("head.", "fc_norm.")


class VisionTransformer(TransformerHooks):
    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        num_classes: int,
        drop_path_rate: float = 0.0,
        global_pool: bool = True,
        probe: bool = False,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.img_size = _pair(img_size)
        self.patch_embed = PatchEmbed(self.img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Learned while fine-tuning; it starts from the pre-trained (sin-cos) values.
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, *self.patch_embed.grid).unsqueeze(0))
        # deeper blocks are dropped more often
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, norm_layer, rate) for rate in rates]
        )
        self.global_pool = global_pool
        if global_pool:
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.01 if probe else 2e-5)
        nn.init.zeros_(head.bias)
        self.head = (
            nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), head)
            if probe
            else head
        )
        nn.init.normal_(self.cls_token, std=0.02)
        self.drop_path_generator: torch.Generator | None = None

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def classifier(self) -> nn.Linear:
        return self.head[1] if isinstance(self.head, nn.Sequential) else self.head

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def set_drop_path_generator(self, generator: torch.Generator | None) -> None:
        """Draw stochastic depth from `generator`, on the model's device (None: torch's global
        stream)."""
        self.drop_path_generator = generator

    def _drop_scales(self, samples: int, like: torch.Tensor) -> torch.Tensor | None:
        """Every block's stochastic-depth factors for this batch [depth, 2, N, 1, 1] (None: nothing
        is dropped)."""
        if not self.training or not any(block.drop_path_rate for block in self.blocks):
            return None
        rates = torch.tensor(
            [[block.drop_path_rate] * 2 for block in self.blocks],
            device=like.device,
            dtype=like.dtype,
        )
        return drop_path_scales(rates, samples, self.drop_path_generator)[..., None, None]

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens [N, 1+L, D] (after the final norm in the probe; pooling normalizes
        afterwards)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self.run_encoder_blocks(torch.cat([cls, x], dim=1), self._drop_scales(x.shape[0], x))
        return x if self.global_pool else self.norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes] from the tokens: the patch tokens' mean and `fc_norm`, or
        the class token."""
        pooled = self.fc_norm(tokens[:, 1:, :].mean(dim=1)) if self.global_pool else tokens[:, 0]
        return self.head(pooled)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.forward_head(self.forward_features(imgs))


def build_classifier(name: str, img_size: int, num_classes: int, drop_path_rate: float = 0.0,
                     probe: bool = False) -> VisionTransformer:
    """The classifier on the encoder of MAE preset `name`; a probe reads the class token,
    fine-tuning pools."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    encoder = {key: PRESETS[name][key] for key in ("patch_size", "embed_dim", "depth", "num_heads")}
    return VisionTransformer(img_size, num_classes=num_classes, drop_path_rate=drop_path_rate,
                             global_pool=not probe, probe=probe, **encoder)


def load_encoder(
    model: VisionTransformer, state: dict[str, torch.Tensor], source: str
) -> list[str]:
    """Copy pre-trained (or fine-tuned) weights into `model`; returns the model's keys left as
    initialised.

    The position embedding is resampled to the model's grid. A file of another model, or a head for
    another number of classes, is a ValueError naming `source` and the first tensor that does not
    fit."""
    own = model.state_dict()
    # the decoder, a pooled model's norm
    state = {key: value for key, value in state.items() if key in own}
    if "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], *model.patch_embed.grid)
    for key, value in state.items():
        if value.shape != own[key].shape:
            what = ("its head is for another number of classes" if key.startswith("head")
                    else "it holds another model")
            raise WeightsError(f"{source}: {what}: {key} is {list(value.shape)}, this model's is "
                               f"{list(own[key].shape)}")
    missing = model.load_state_dict(state, strict=False).missing_keys
    encoder_missing = [
        key
        for key in missing
        if not key.startswith(HEAD_KEYS) and key != "norm.weight" and key != "norm.bias"
    ]
    if encoder_missing:
        raise WeightsError(
            f"{source}: not an encoder of this model: {len(encoder_missing)} tensors missing, "
            f"e.g. {', '.join(encoder_missing[:4])}"
        )
    return missing
