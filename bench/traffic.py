"""A training step's traffic budget, counted op by op on the CPU, no timing: the FLOPs of its
matmuls and the bytes every other op reads and writes, per image, and the H200 step they project to.

The matmuls (projections, MLPs, attention, the patch embedding) run near the tensor cores' peak;
everything else (norms, GELU, residual adds, softmax outside a fused attention, casts, the masking
and loss) is bound by memory bandwidth. Counted under bf16 autocast, as the GPU presets train. The
projection is a bound of that reading: each part at its own measured ceiling, nothing overlapped, no
launch overhead; a compiled step fuses some of the "other" bytes away, an eager one moves them all.
It says where a step's time can go, not what a GPU measured.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.harness import kernels_backend
from model import build_mae
from model.flops import mae_train_flops

MATMUL_TFLOPS = 790.0  # dense bf16 matmuls an H200 sustains (of its 989 peak)
MEMORY_TB_S = 4.3  # what its HBM3e sustains (of 4.8)
ATEN = torch.ops.aten
MATMULS = {
    ATEN.mm,
    ATEN.addmm,
    ATEN.bmm,
    ATEN.baddbmm,
    ATEN.convolution,
    ATEN.convolution_backward,
    ATEN._scaled_dot_product_flash_attention_for_cpu,
    ATEN._scaled_dot_product_flash_attention_for_cpu_backward,
}


def _bytes(values: Any) -> int:
    return sum(
        t.numel() * t.element_size() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)
    )


class OtherBytes(TorchDispatchMode):
    """Bytes read and written by every op that is neither a matmul nor a view (which moves nothing),
    by op."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in MATMULS and not func.is_view:
            self.by_op[func.overloadpacket.__name__] += _bytes((args, kwargs)) + _bytes(out)
        return out


@dataclass(frozen=True)
class Budget:
    model: str
    local_batch_size: int  # the projection's images per forward pass (the preset's)
    matmul_flops_per_image: float
    other_bytes_per_image: float  # what grows with the batch: activations
    # what does not: the weights' casts, gradients, norms over parameters
    other_bytes_per_step: float
    top_ops: list[tuple[str, float]]  # the other ops moving the most bytes per image at this batch

    @property
    def projected_seconds_per_image(self) -> float:
        moved = self.other_bytes_per_image + self.other_bytes_per_step / self.local_batch_size
        return self.matmul_flops_per_image / (MATMUL_TFLOPS * 1e12) + moved / (MEMORY_TB_S * 1e12)

    @property
    def memory_share(self) -> float:
        """Of the projected step, the part spent moving the other ops' bytes."""
        matmuls = self.matmul_flops_per_image / (MATMUL_TFLOPS * 1e12)
        return 1 - matmuls / self.projected_seconds_per_image


def _count(model: torch.nn.Module, img_size: int, batch: int) -> Counter[str]:
    images = torch.randn(batch, 3, img_size, img_size)
    counter = OtherBytes()
    with kernels_backend("torch"), counter:
        with torch.autocast("cpu", torch.bfloat16):  # the forward only, as DeepSpeed runs it
            loss, _, _ = model(images, 0.75)
        loss.backward()
    model.zero_grad(set_to_none=True)  # the next count starts, as a step does, without gradients
    return counter.by_op


def mae_budget(name: str, img_size: int, local_batch_size: int) -> Budget:
    """One forward and backward of MAE `name` under bf16 autocast (the torch references of the fused
    ops, as an eager step runs them), counted at batch 1 and 2 on the CPU: their difference is what
    each image adds, the rest what a step moves whatever its batch."""
    torch.manual_seed(0)
    model = build_mae(name, img_size=img_size, norm_pix_loss=True)
    one, two = _count(model, img_size, 1), _count(model, img_size, 2)
    per_image = {op: two[op] - one[op] for op in two}
    per_step = sum(one.values()) - sum(per_image.values())
    share = {op: per_image[op] + (one[op] - per_image[op]) / local_batch_size for op in two}
    top = sorted(share.items(), key=lambda item: -item[1])[:6]
    flops = mae_train_flops(model)
    return Budget(
        name, local_batch_size, float(flops), float(sum(per_image.values())), float(per_step), top
    )
