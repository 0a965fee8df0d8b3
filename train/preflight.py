"""What a node must have before a run spends its time there: checked once per rank when a run starts
(the trainer) and before a benchmark suite's first stage (`python -m train.preflight`).

- Triton: a tiny kernel compiled and launched on the rank's device, in the run's dtype. Its first
launch on a GPU
  builds Triton's C launcher with the node's C compiler and Python's headers. Where it cannot run,
  "auto" kernels fall back to their torch references for the run (one line per rank; the run goes
  on, as a failed compile of the blocks does); "triton" refuses the run.
- DALI: one JPEG decoded on the rank's device ("mixed" decoding on a GPU): a DALI built for another
CUDA than the
  driver's fails here, not in the first epoch. It refuses the run; a DALI that is not installed only
  falls back to the PIL loader (`pipeline.build_loader` says so).
- The packages the trainer and the benchmarks import (the command line checks them all).
Each missing thing is one line naming what to install.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from model import KernelChoice, effective_choice, runs_on, triton_failure

INSTALL_COMPILER = (
    "install a C compiler and Python's headers (Debian, Ubuntu: build-essential python3-dev; RHEL: "
    "gcc python3-devel), or set CC to one"
)
INSTALL_DALI = (
    "install the DALI built for this node's driver (nvidia-smi shows it): nvidia-dali-cuda120 for "
    "drivers >= 525, nvidia-dali-cuda130 for drivers >= 580"
)
# What the trainer and the benchmark stages import, and what to install for each (`bash run.sh
# setup`, or offline from a wheelhouse, installs them all).
PACKAGES = {
    "deepspeed": "deepspeed (the trainer)",
    "nvidia.dali": "nvidia-dali-cuda120 or -cuda130 (the loader; without it the PIL loader runs)",
    "triton": "triton (the fused kernels)",
    "webdataset": "webdataset (the loader's benchmark and tests)",
    "braceexpand": "braceexpand (shard patterns)",
    "einops": "einops (the model)",
    "PIL": "pillow (images)",
    "psutil": "psutil (the tests)",
    "pytest": "pytest (the GPU tests)",
}


class PreflightError(RuntimeError):
    """The node cannot run what the config asks for: the message names what to install or to set."""


def kernel_choice(
    device: torch.device, dtype: torch.dtype, choice: KernelChoice
) -> tuple[KernelChoice, str | None]:
    """The kernels a run on `device` in `dtype` uses given the config's `choice`, and a line to say
    when Triton cannot run there ("auto" then falls back to the references); PreflightError when
    `choice` insists on Triton."""
    choice = effective_choice(choice)
    if choice == "torch" or (choice == "auto" and not runs_on(device)):
        return choice, None
    failure = triton_failure(device, dtype)
    if failure is None:
        return choice, None
    if choice == "triton":
        raise PreflightError(
            f"runtime.kernels=triton, but Triton cannot run on {device} in {dtype} ({failure}): "
            f"{INSTALL_COMPILER}, or set runtime.kernels=auto"
        )
    return "torch", (
        f"Triton cannot run on {device} in {dtype} ({failure}): the masking and loss kernels' "
        f"torch references run instead, slower; to use the kernels, {INSTALL_COMPILER}"
    )


def _one_jpeg() -> np.ndarray:
    encoded = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 120, 40)).save(encoded, format="JPEG")
    return np.frombuffer(encoded.getvalue(), dtype=np.uint8)


def dali_failure(device: torch.device) -> str | None:
    """Why DALI cannot decode a JPEG on `device` (GPU: "mixed", as the loader does), in one line, or
    None."""
    if importlib.util.find_spec("nvidia.dali") is None:
        return "DALI is not installed"
    from nvidia.dali import fn, pipeline_def, types

    encoded = _one_jpeg()
    gpu = device.type == "cuda"

    @pipeline_def(
        batch_size=1, num_threads=1, device_id=device.index if gpu else None, prefetch_queue_depth=1
    )
    def decode_one():
        jpegs = fn.external_source(source=lambda: [encoded], batch=True)
        return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)

    try:
        pipe = decode_one()
        pipe.build()
        (images,) = pipe.run()
        shape = tuple((images.as_cpu() if gpu else images).at(0).shape)
    # a DALI for another CUDA, a driver too old, no nvJPEG: each says what it is
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
    return None if shape == (16, 24, 3) else f"a 24x16 JPEG decoded to shape {shape}"


def check_loader(device: torch.device, backend: str) -> None:
    """PreflightError when the run's loader is DALI and DALI is installed but cannot decode on
    `device`."""
    if backend != "dali" or importlib.util.find_spec("nvidia.dali") is None:
        return
    failure = dali_failure(device)
    if failure is not None:
        raise PreflightError(f"DALI cannot decode on {device} ({failure}): {INSTALL_DALI}")


def check_rank(
    model: Any,
    cfg: Any,
    device: torch.device,
    agree: Callable[[Callable[[], Any]], Any],
    say_on_every_rank: Callable[[str], None],
) -> None:
    """What a run's rank must run on its device: DALI's decoding (`cfg.data.backend`), and the fused
    kernels of `model` where it has them (its `kernels` choice; a fallback sets it to the
    references). A refusal on any rank is one on every rank (`agree`); a fallback is said by the
    rank it concerns."""
    choice = getattr(model, "kernels", None)  # None: the model has no fused kernels
    # what the kernels see
    dtype = torch.float32 if cfg.runtime.precision == "fp32" else torch.bfloat16

    def check() -> tuple[KernelChoice | None, str | None]:
        check_loader(device, cfg.data.backend)
        return (None, None) if choice is None else kernel_choice(device, dtype, choice)

    choice, line = agree(check)
    if line is not None:
        say_on_every_rank(line)
    if choice is not None:
        model.kernels = choice


def missing_packages() -> list[str]:
    """One line per package the trainer or a benchmark stage imports that this interpreter
    cannot."""
    return [
        f"missing: {what}"
        for module, what in PACKAGES.items()
        if importlib.util.find_spec(module) is None
    ]


def main(argv: list[str] | None = None) -> int:
    """Every check on this machine's first GPU (or the CPU), a line each; exit 1 when anything is
    missing."""
    parser = argparse.ArgumentParser(
        prog="python -m train.preflight", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="the dtype the kernels run in (the CPU interpreter has no bfloat16)")
    args = parser.parse_args(argv)
    gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        print(
            f"error: no GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda})",
            file=sys.stderr,
        )
        return 1
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    problems = missing_packages()
    dtype = getattr(torch, args.dtype)
    kernels = "ok" if not runs_on(device) else (triton_failure(device, dtype) or "ok")
    if kernels != "ok":
        problems.append(f"Triton on {device}: {kernels}: {INSTALL_COMPILER}")
    dali = (
        "not installed"
        if importlib.util.find_spec("nvidia.dali") is None
        else (dali_failure(device) or "ok")
    )
    if dali not in ("ok", "not installed"):
        problems.append(f"DALI on {device}: {dali}: {INSTALL_DALI}")
    print(
        f"preflight on {device} ({torch.cuda.get_device_name(device) if gpu else 'CPU'}), torch "
        f"{torch.__version__}: Triton kernels "
        f"{kernels if runs_on(device) else 'not used on a CPU (the torch references run)'}, DALI "
        f"decoding {dali}"
    )
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
