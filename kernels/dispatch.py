"""Choose between the fused Triton kernels and their plain-torch references, and check that Triton
runs here.

The choice is the model's (`MaskedAutoencoderViT.kernels`, from the config's `runtime.kernels`):
- "auto" uses Triton for CUDA tensors, or for CPU tensors when `TRITON_INTERPRET=1` is set, else the
references;
- "torch" always uses the references; "triton" insists on Triton and raises where it cannot run the
tensors. `MAE_KERNELS=auto|torch|triton` in the environment overrides every model's choice (tests
and benchmarks).

Triton's first launch on a GPU builds its C launcher with the node's C compiler and Python's
headers, then compiles the kernel: `triton_failure` launches a tiny kernel once so that a node
without them is found before the first training step, not in it (`train.preflight`).
"""

from __future__ import annotations

import os
from typing import Literal, get_args

import torch
import triton
import triton.language as tl

KernelChoice = Literal["auto", "torch", "triton"]
OVERRIDE = "MAE_KERNELS"

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# numpy, which the interpreter computes with, has no bfloat16.
_INTERPRETER_DTYPES = (torch.float32, torch.float16)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def effective_choice(choice: KernelChoice) -> KernelChoice:
    """`choice`, unless the environment's override names another."""
    override = os.environ.get(OVERRIDE, "").strip().lower()
    if not override:
        return choice
    if override not in get_args(KernelChoice):
        raise ValueError(f"{OVERRIDE} must be auto, torch or triton, got {override!r}")
    return override  # type: ignore[return-value]


def use_triton(op: str, *tensors: torch.Tensor, choice: KernelChoice = "auto",
               unsupported: str | None = None) -> bool:
    """True when `op` should run its Triton kernel on `tensors` under `choice`.

    `unsupported` is the caller's reason the kernel cannot take these inputs (None if it can).
    """
    choice = effective_choice(choice)
    if choice == "torch":
        return False
    reason = unsupported or _why_not_runnable(tensors)
    if reason and choice == "triton":
        raise RuntimeError(f"kernels set to triton but {op} cannot run in Triton: {reason}")
    return reason is None


def runs_on(device: torch.device) -> bool:
    """Whether "auto" sends tensors on `device` to Triton at all."""
    return device.type == "cuda" or interpreter_enabled()


def _why_not_runnable(tensors: tuple[torch.Tensor, ...]) -> str | None:
    on_cuda = all(t.is_cuda for t in tensors)
    if not on_cuda and not interpreter_enabled():
        return "tensors are not on a CUDA device and TRITON_INTERPRET=1 is not set"
    allowed = _GPU_DTYPES if on_cuda else _INTERPRETER_DTYPES
    bad = sorted(
        {str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype not in allowed}
    )
    if bad:
        where = "on CUDA" if on_cuda else "under the Triton interpreter"
        return f"dtype {', '.join(bad)} is not supported {where}"
    return None


@triton.jit
def _probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    tl.store(out_ptr + offsets, x * 2 + 1, mask=inside)


def triton_failure(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why Triton cannot run kernels on `device` in `dtype`, in one line, or None: a tiny kernel
    compiled, launched and computed the right values there."""
    try:
        x = torch.arange(6, device=device).to(dtype)
        out = torch.empty_like(x)
        _probe[(1,)](x, out, x.numel(), BLOCK=8)
        if not torch.equal(out, x * 2 + 1):
            return "a tiny kernel computed wrong values"
    # a missing compiler, missing headers, a driver, a dtype: each says what it is
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"{type(err).__name__}: {lines[-1] if lines else 'no message'}"
    return None
