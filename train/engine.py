"""What DeepSpeed is asked for, and the model switches around it (attention backend, compile,
recompute).

The DeepSpeed config is derived from maeflow's own; a user's DeepSpeed JSON
(`runtime.deepspeed_config`) is merged over it for everything maeflow does not decide itself (bucket
sizes, overlap, monitors...). The merged config is saved beside config.json as
deepspeed_config.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.hooks import TransformerHooks
from train.config import ConfigError, RunConfig, RuntimeConfig
from train.distributed import local_rank
from train.recipe import BatchPlan

# Keys maeflow derives from its own config; a user's DeepSpeed JSON may not set them, since a second
# source for the batch, the precision or the optimizer would make the run differ from its
# config.json.
DERIVED_KEYS = {
    "train_batch_size": "optim.global_batch_size",
    "train_micro_batch_size_per_gpu": "optim.local_batch_size",
    "gradient_accumulation_steps": "optim.grad_accum_steps",
    "optimizer": "optim.* (maeflow builds a fused torch AdamW)",
    "scheduler": "optim.* (maeflow sets the lr every iteration)",
    "bf16": "runtime.precision",
    "fp16": "runtime.precision",
    "torch_autocast": "runtime.precision",
    "gradient_clipping": "optim.gradient_clipping",
}
ATTENTION_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def image_dtype(cfg: RunConfig) -> torch.dtype:
    """What the loaders deliver and the model takes: bf16 for bf16 weights; under autocast the
    images stay fp32, as in the reference code."""
    return torch.bfloat16 if cfg.runtime.precision == "bf16" else torch.float32


def apply_model_switches(
    model: torch.nn.Module, cfg: RunConfig, report: Callable[[str], None] = print
) -> None:
    """The config's speed and memory switches, through the hooks maeflow's model families have
    (model.hooks); a task's model without them is refused the switches. `report`: where a rank says
    that compiling failed on it and it runs eager."""
    if not isinstance(model, TransformerHooks):
        if cfg.runtime.compile or cfg.model.activation_recompute:
            raise ConfigError(
                "runtime.compile and model.activation_recompute work through "
                f"model.hooks.TransformerHooks, which this task's {type(model).__name__} does not "
                "have: set both to false, or give the model those hooks"
            )
        return
    model.set_grad_checkpointing(cfg.model.activation_recompute)
    if cfg.runtime.compile:
        model.compile_blocks(cfg.runtime.compile_backend, report)


def engine_args(device: torch.device) -> argparse.Namespace:
    """What deepspeed.initialize reads of a command line: the device maeflow chose for this rank.
    Left to itself, DeepSpeed takes its LOCAL_RANK's GPU (its engine's `_set_distributed_vars`), so
    a task bound to its own GPU (srun --gpus-per-task=1, --gpu-bind: one visible device) with local
    rank 1 or more would ask for a device that does not exist there."""
    return argparse.Namespace(device_rank=device.index if device.type == "cuda" else local_rank())


def deepspeed_config(cfg: RunConfig, plan: BatchPlan) -> dict[str, Any]:
    """The DeepSpeed config for this run: maeflow's derived keys, then the user's file merged over
    the rest."""
    ours: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.local_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "zero_optimization": {"stage": cfg.runtime.zero_stage},
        "gradient_clipping": cfg.optim.gradient_clipping,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronizes the device at every forward
        # and step: a stall per micro-step. maeflow times its windows itself; a user's JSON may turn
        # the timer back on.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if cfg.runtime.precision == "bf16":
        ours["bf16"] = {"enabled": True}
    elif cfg.runtime.precision == "autocast_bf16":
        ours["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if not cfg.runtime.deepspeed_config:
        return ours
    path = Path(cfg.runtime.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"runtime.deepspeed_config {path}: {err}") from None
    clashes = sorted(set(user) & set(DERIVED_KEYS))
    if clashes:
        raise ConfigError(
            f"runtime.deepspeed_config {path} sets {clashes[0]}, which maeflow derives: set "
            f"{DERIVED_KEYS[clashes[0]]} instead"
        )
    if "stage" in user.get("zero_optimization", {}):
        raise ConfigError(
            f"runtime.deepspeed_config {path} sets zero_optimization.stage: set runtime.zero_stage"
        )
    return _merged(ours, user)


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def weights_cast_once(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Around an optimizer step's whole accumulation: under autocast each weight's bf16 copy is made
    once per optimizer step, not once per micro-step (at ViT-H, 8 GB of copies per micro-step
    otherwise).

    Autocast keeps the copies it makes of weights until its outermost region ends, and DeepSpeed's
    autocast around each forward pass nests inside this one. This region itself is disabled: the
    backward passes and the optimizer step run outside autocast, as they would without it. It ends
    right after the optimizer step, so no copy outlives the weights it was made from."""
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def evaluating(module: torch.nn.Module, runtime: RuntimeConfig, device: torch.device,
               gather: bool = True) -> Iterator[None]:
    """An evaluation's forward passes, alike for every job and command: `module` in eval mode (and
    back to what it was after), no gradients, bf16 autocast where the run computes under it
    (`runtime.precision` autocast_bf16), the run's attention backend, and under ZeRO-3 every rank's
    slices of the weights gathered (`gather` False for DeepSpeed's engine, whose forward gathers
    them itself)."""
    gathered = deepspeed.zero.GatheredParameters(list(module.parameters()),
                                                 enabled=gather and runtime.zero_stage == 3)
    autocast = torch.autocast(
        device.type, torch.bfloat16, enabled=runtime.precision == "autocast_bf16"
    )
    was_training = module.training
    module.eval()
    try:
        with gathered, autocast, attention_backend(runtime.attention), torch.no_grad():
            yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """SDPA restricted to one backend ("auto": torch's own choice, which on an H100 in bf16 is
    flash)."""
    if name == "auto":
        yield
        return
    with sdpa_kernel(ATTENTION_BACKENDS[name]):
        yield
