"""The hooks both model families expose, as timm's models do: which blocks `torch.compile` takes,
gradient checkpointing of the encoder's blocks, and the encoder's tokens (`forward_features`) with
one meaning everywhere: every patch of an unmasked image in order, the class token first, [N, 1+L,
D]."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._functorch.config
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.dispatch import KernelChoice


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost exception: the compiler's wrappers say only that a backend
    raised."""
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
        err = inner
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


class TrainingGraphs:
    """Each block's graph for the training step, compiled for the one shape a run's steps feed it.

    `dynamic=False`: one static-shape graph per block, never recompiled. Evaluation (other batch
    sizes, every patch instead of the visible ones) runs the same blocks eager, so its shapes never
    reach the compiler. `fullgraph=True`: a graph break is an error, not a silent slowdown. A
    block's first call compiles its backward too, so that any failure to compile shows there; it
    then falls back, with every other block, to eager: a compiler missing on one node costs that
    node speed, never the job.
    """

    def __init__(
        self, blocks: list[nn.Module], backend: str, report: Callable[[str], None]
    ) -> None:
        self._graphs = {
            id(block): torch.compile(block, backend=backend, dynamic=False, fullgraph=True)
            for block in blocks
        }
        self._compiled: set[int] = set()
        self._report = report
        self.failure: str | None = None  # why the blocks run eager, once a compilation failed

    def __call__(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        graph = self._graphs.get(id(block)) if self.failure is None else None
        if graph is None:
            return block(*args)
        if id(block) in self._compiled:
            return graph(*args)
        try:
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
                out = graph(*args)
        # a compiler's failure of any kind; a bug of the block's fails eager again below
        except Exception as err:
            self.failure = _root_cause(err)
            self._report(
                "runtime.compile: compiling a block failed, so every block runs eager "
                f"({self.failure})"
            )
            return block(*args)
        self._compiled.add(id(block))
        return out


class TransformerHooks(nn.Module):
    """Mixed into a model whose encoder blocks are `self.blocks`."""

    # recompute the encoder's blocks in the backward pass: less memory, more compute
    grad_checkpointing = False
    # the blocks' compiled graphs, after compile_blocks
    training_graphs: TrainingGraphs | None = None
    # the fused kernels' choice where the forward pass has them (the MAE)
    kernels: KernelChoice | None = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def compile_targets(self) -> list[nn.Module]:
        """The modules `compile_blocks` compiles: the transformer blocks, which hold nearly all the
        compute."""
        return list(self.blocks)

    def compile_blocks(
        self, backend: str = "inductor", report: Callable[[str], None] = print
    ) -> None:
        """torch.compile each block for the training step (`TrainingGraphs`). The model keeps its
        parameter names (checkpoints and exports are unchanged) and what lies between blocks (the
        masking and loss kernels) stays outside the graphs. `report`: where the one line goes if
        compiling fails on this node."""
        self.training_graphs = TrainingGraphs(self.compile_targets(), backend, report)

    def run_block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """`block(*args)`, through its compiled graph in a training step (train mode, gradients
        on)."""
        graphs = self.training_graphs
        if graphs is not None and self.training and torch.is_grad_enabled():
            return graphs(block, *args)
        return block(*args)

    def run_encoder_blocks(
        self, x: torch.Tensor, drop_scales: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The encoder's blocks; `drop_scales` [depth, 2, N, 1, 1]: each block's stochastic-depth
        factors."""
        for i, block in enumerate(self.blocks):
            args = (x,) if drop_scales is None else (x, drop_scales[i])
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self.run_block, block, *args, use_reentrant=False)
            else:
                x = self.run_block(block, *args)
        return x
