"""Choose between the fused Triton kernels and their plain-torch references.

`MAE_KERNELS=auto` (default) uses Triton for CUDA tensors, or for CPU tensors when
`TRITON_INTERPRET=1` is set; `MAE_KERNELS=torch` always uses the references; `MAE_KERNELS=triton`
insists on Triton and raises if it cannot run the given tensors.
"""

from __future__ import annotations

import os

import torch

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# numpy, which the interpreter computes with, has no bfloat16.
_INTERPRETER_DTYPES = (torch.float32, torch.float16)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(op: str, *tensors: torch.Tensor, unsupported: str | None = None) -> bool:
    """True when `op` should run its Triton kernel on `tensors`.

    `unsupported` is the caller's reason the kernel cannot take these inputs (None if it can).
    """
    choice = os.environ.get("MAE_KERNELS", "auto").strip().lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"MAE_KERNELS must be auto, torch or triton, got {choice!r}")
    if choice == "torch":
        return False
    reason = unsupported or _why_not_runnable(tensors)
    if reason and choice == "triton":
        raise RuntimeError(f"MAE_KERNELS=triton but {op} cannot run in Triton: {reason}")
    return reason is None


def _why_not_runnable(tensors: tuple[torch.Tensor, ...]) -> str | None:
    on_cuda = all(t.is_cuda for t in tensors)
    if not on_cuda and not interpreter_enabled():
        return "tensors are not on a CUDA device and TRITON_INTERPRET=1 is not set"
    allowed = _GPU_DTYPES if on_cuda else _INTERPRETER_DTYPES
    bad = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype not in allowed})
    if bad:
        where = "on CUDA" if on_cuda else "under the Triton interpreter"
        return f"dtype {', '.join(bad)} is not supported {where}"
    return None

