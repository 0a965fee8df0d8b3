"""The hooks both model families expose, as timm's models do: which blocks `torch.compile` takes, gradient
checkpointing of the encoder's blocks, and the encoder's tokens (`forward_features`) with one meaning everywhere:
every patch of an unmasked image in order, the class token first, [N, 1+L, D]."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class TransformerHooks(nn.Module):
    """Mixed into a model whose encoder blocks are `self.blocks`."""

    grad_checkpointing = False  # recompute the encoder's blocks in the backward pass: less memory, more compute

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def compile_targets(self) -> list[nn.Module]:
        """The modules `compile_blocks` compiles: the transformer blocks, which hold nearly all the compute."""
        return list(self.blocks)

    def compile_blocks(self) -> None:
        """torch.compile each block in place: the model keeps its parameter names (checkpoints and exports are
        unchanged) and what lies between blocks (the masking and loss kernels) stays outside the graphs."""
        for block in self.compile_targets():
            block.compile()

    def run_encoder_blocks(self, x: torch.Tensor, drop_scales: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's blocks; `drop_scales` [depth, 2, N, 1, 1]: each block's stochastic-depth factors."""
        for i, block in enumerate(self.blocks):
            args = (x,) if drop_scales is None else (x, drop_scales[i])
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return x
