"""Each fused kernel against eager torch (the reference formulation) and torch.compile of it.

Forward + backward, reported as effective GB/s over the fewest bytes the op must move (each input
read once, each output written once; the loss reads only the removed patches). Gradients flow
where the model's do: not into the frozen position embeddings, nor into the images. On a GPU the
headline number is device time (the kernels' own durations, what a training step pays, since the
CPU runs ahead of the GPU there), compared with a device-to-device copy, the ceiling; wall time is
kept beside it. On a CPU the Triton kernels run in the interpreter: those numbers check the
harness, not the speed, and are tagged so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from bench.context import BenchContext
from bench.harness import Record, device_seconds, rate, time_repeats
from kernels import (
    decoder_tokens,
    decoder_tokens_reference,
    masked_patch_mse,
    masked_patch_mse_reference,
    visible_tokens,
    visible_tokens_reference,
)
from kernels.dispatch import interpreter_enabled
from model import random_masking


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    length: int
    keep: int
    width: int
    dec_width: int
    patch: int


GPU_SHAPES = [
    Shape("vit_b16", 256, 196, 49, 768, 512, 16),
    Shape("vit_h14", 128, 256, 64, 1280, 512, 14),
]
CPU_SHAPES = [Shape("tiny_interpreter", 4, 16, 4, 64, 32, 8)]


def fwd_bwd(
    fn: Callable, inputs: list[torch.Tensor], trained: list[bool], extra: tuple
) -> Callable[[], None]:
    """One forward and backward of `fn`, with gradients for the inputs marked `trained`."""
    leaves = [t.detach().requires_grad_(wanted) for t, wanted in zip(inputs, trained, strict=True)]
    wrt = [leaf for leaf in leaves if leaf.requires_grad]
    out = fn(*leaves, *extra)
    grad_out = torch.randn_like(out)

    def step() -> None:
        result = fn(*leaves, *extra)
        torch.autograd.grad(result, wrt, grad_out)

    return step


def cases(shape: Shape, device: str, dtype: torch.dtype) -> Iterator[tuple]:
    """(kernel name, ours, reference, inputs, which inputs are trained, extra args, bytes moved by
    forward + backward).

    Every tensor is in `dtype`, as in the trainer (DeepSpeed bf16 keeps parameters and images in
    bf16).
    """
    n, length, keep, d, dd, p = (
        shape.n,
        shape.length,
        shape.keep,
        shape.width,
        shape.dec_width,
        shape.patch,
    )
    size = torch.finfo(dtype).bits // 8

    def randn(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, device=device, dtype=dtype)

    ids_keep, ids_restore, mask = random_masking(
        torch.rand(n, length, device=device), 1 - (keep + 0.5) / length
    )
    # forward reads the K kept rows and writes 1+K; backward reads 1+K and writes all L rows of
    # grad_x
    gather_bytes = size * n * d * ((2 * keep + 1) + (keep + 1 + length))
    yield (
        "visible_tokens",
        visible_tokens,
        visible_tokens_reference,
        [randn(n, length, d), randn(1, length + 1, d), randn(1, 1, d)],
        [True, False, True],
        (ids_keep, ids_restore),
        gather_bytes,
    )
    # forward reads 1+K rows and writes 1+L; backward the reverse
    unshuffle_bytes = 2 * size * n * dd * ((keep + 1) + (length + 1))
    yield (
        "decoder_tokens",
        decoder_tokens,
        decoder_tokens_reference,
        [randn(n, keep + 1, dd), randn(1, 1, dd), randn(1, length + 1, dd)],
        [True, True, False],
        (ids_restore,),
        unshuffle_bytes,
    )
    side = int(length**0.5) * p
    values = p * p * 3
    removed = int(mask.sum().item())
    # both passes read image and prediction of the removed patches only; backward writes the whole
    # gradient
    loss_bytes = 2 * removed * values * 2 * size + n * length * values * size
    yield (
        "masked_patch_mse",
        masked_patch_mse,
        masked_patch_mse_reference,
        [randn(n, length, values)],
        [True],
        (randn(n, 3, side, side), mask, p, True),
        loss_bytes,
    )


def copy_bandwidth(device: str, repeats: int) -> Record:
    src = torch.empty(2**29, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_repeats(lambda: dst.copy_(src), repeats, warmup=3, device="cuda")
    return Record("kernels", "device_to_device_copy", "GB/s", rate(2 * src.numel() / 1e9, seconds),
                  config={"bytes": src.numel()})


def run(ctx: BenchContext) -> Iterator[Record]:
    gpu = ctx.device == "gpu"
    if not gpu and not interpreter_enabled():
        raise RuntimeError(
            "the CPU kernel bench needs TRITON_INTERPRET=1 before kernels are imported"
        )
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    repeats = (20 if ctx.quick else 100) if gpu else 3
    with_compile = gpu or not ctx.quick
    copy = copy_bandwidth(device, repeats) if gpu else None
    if copy is not None:
        yield copy
    copy_gb_per_s = copy.ours.median if copy is not None else None
    for shape in GPU_SHAPES if gpu else CPU_SHAPES:
        for name, ours, reference, inputs, trained, extra, nbytes in cases(shape, device, dtype):
            gigabytes = nbytes / 1e9
            timed = {"ours": ours, "eager": reference}
            if with_compile:
                timed["compiled"] = torch.compile(reference, dynamic=False)
            steps = {label: fwd_bwd(fn, inputs, trained, extra) for label, fn in timed.items()}
            wall = {
                label: rate(
                    gigabytes,
                    time_repeats(step, repeats, warmup=3, device="cuda" if gpu else "cpu"),
                )
                for label, step in steps.items()
            }
            busy = (
                {
                    label: rate(gigabytes, device_seconds(step, repeats))
                    for label, step in steps.items()
                }
                if gpu
                else wall
            )
            config = {
                "shape": shape.__dict__,
                "dtype": str(dtype).removeprefix("torch."),
                "bytes": nbytes,
                "pass": "forward+backward",
                "timing": "device time (profiler)" if gpu else "wall time",
            }
            extra_info = {
                "wall_gb_per_s": wall["ours"].median,
                "eager_wall_gb_per_s": wall["eager"].median,
                "device_us": nbytes / busy["ours"].median / 1e3,
            }
            if copy_gb_per_s:
                extra_info["fraction_of_copy"] = busy["ours"].median / copy_gb_per_s
            if with_compile:
                extra_info["compiled_gb_per_s"] = busy["compiled"].median
                extra_info["ratio_vs_compiled"] = busy["ours"].median / busy["compiled"].median
            yield Record(
                "kernels",
                f"{name}.{shape.name}",
                "GB/s",
                busy["ours"],
                busy["eager"],
                "eager torch (reference formulation)",
                config,
                interpreter=not gpu,
                extra=extra_info,
            )
