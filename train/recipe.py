"""The paper's optimisation recipe (He et al. 2021, appendix A.1): the global batch split over ranks
and accumulation steps, AdamW without weight decay on biases and 1-D parameters, lr = blr x global
batch / 256, linear warm-up then half-cycle cosine, set every iteration."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.epoch_plan import train_batches_per_rank
from train.config import ConfigError, OptimConfig


@dataclass(frozen=True)
class BatchPlan:
    local_batch_size: int
    grad_accum_steps: int
    world_size: int
    note: str  # how the missing numbers were derived, for the start-up log

    @property
    def global_batch_size(self) -> int:
        return self.local_batch_size * self.grad_accum_steps * self.world_size


def plan_batch(optim: OptimConfig, world_size: int) -> BatchPlan:
    """Derive the local batch or the accumulation so that local x accumulation x ranks = global
    batch.

    With neither given, the plan takes the fewest accumulation steps whose local batch is at most
    `max_local_batch_size`: the presets set that limit from memory, and the rank count does the
    rest."""
    batch, local, accum, limit = (
        optim.global_batch_size,
        optim.local_batch_size,
        optim.grad_accum_steps,
        optim.max_local_batch_size,
    )
    if local and accum:
        if local * accum * world_size != batch:
            raise ConfigError(
                f"optim.global_batch_size {batch} != local_batch_size {local} x grad_accum_steps "
                f"{accum} x {world_size} ranks; fix one or set it to 0 to derive it"
            )
        return BatchPlan(local, accum, world_size, "as configured")
    if local:
        accum, rest = divmod(batch, local * world_size)
        note = f"grad_accum_steps = {batch} / ({local} x {world_size} ranks) = {accum}"
    elif accum:
        local, rest = divmod(batch, accum * world_size)
        note = f"local_batch_size = {batch} / ({accum} accumulation x {world_size} ranks) = {local}"
    else:
        fitting = [a for a in range(1, batch + 1) if batch % (a * world_size) == 0
                   and (not limit or batch // (a * world_size) <= limit)]
        accum = fitting[0] if fitting else 0
        local, rest = (batch // (accum * world_size), 0) if accum else (0, 1)
        bound = f", the fewest steps keeping it <= max_local_batch_size {limit}" if limit else ""
        note = f"local_batch_size {local}, grad_accum_steps {accum}{bound}"
    if rest or not local or not accum:
        raise ConfigError(
            f"optim.global_batch_size {batch} does not split evenly over {world_size} ranks "
            f"(local_batch_size {optim.local_batch_size or '?'}, "
            f"grad_accum_steps {optim.grad_accum_steps or '?'})"
        )
    return BatchPlan(local, accum, world_size, note)



def optimizer_steps_per_epoch(train_samples: int, plan: BatchPlan) -> int:
    """Optimizer steps an epoch of `train_samples` makes under `plan`; a ConfigError when it makes
    none."""
    local_batches = train_batches_per_rank(train_samples, plan.world_size, plan.local_batch_size)
    steps = local_batches // plan.grad_accum_steps
    if steps == 0:
        raise ConfigError(
            f"{train_samples} training samples make no optimizer step of {plan.local_batch_size} "
            f"local x {plan.grad_accum_steps} accumulation on {plan.world_size} ranks: use a "
            "smaller batch or more data"
        )
    return steps


@dataclass(frozen=True)
class Schedule:
    """The run's length and its progress counted in samples seen: a resume with another global batch
    (a lost node, a batch that does not split over the new rank count) continues the lr schedule
    where it was and ends the run where it would have ended. Unchanged, it is the per-step schedule
    (progress = step / steps per epoch)."""

    epoch_samples: int
    """samples one epoch trains on under the current batch plan (its optimizer steps x the global
    batch)"""
    epochs: int

    @classmethod
    def of(cls, train_samples: int, plan: BatchPlan, epochs: int) -> Schedule:
        return cls(optimizer_steps_per_epoch(train_samples, plan) * plan.global_batch_size, epochs)

    def progress(self, samples_seen: int) -> float:
        """Epochs done, fractionally: what the lr schedule is a function of."""
        return samples_seen / self.epoch_samples

    def steps_left(self, samples_seen: int, global_batch_size: int) -> int:
        """Optimizer steps of `global_batch_size` until the schedule's `epochs` are done."""
        return max(
            0, math.ceil((self.epochs * self.epoch_samples - samples_seen) / global_batch_size)
        )


def peak_lr(optim: OptimConfig, global_batch_size: int) -> float:
    """optim.lr when set, else the linear scaling rule blr x global batch / 256."""
    return optim.lr or optim.blr * global_batch_size / 256


def lr_at(progress_epochs: float, peak: float, optim: OptimConfig) -> float:
    """Linear warm-up from 0, then half-cycle cosine to min_lr (the paper's per-iteration
    schedule)."""
    if progress_epochs < optim.warmup_epochs:
        return peak * progress_epochs / optim.warmup_epochs
    done = (progress_epochs - optim.warmup_epochs) / (optim.epochs - optim.warmup_epochs)
    return optim.min_lr + (peak - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on 1-D parameters (norms) and biases; frozen position embeddings left
    out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def layer_decay_groups(
    model: torch.nn.Module, depth: int, weight_decay: float, layer_decay: float
) -> list[dict]:
    """Fine-tuning's groups (appendix A.2): layer-wise lr decay, with the patch embedding, class
    token and position embedding as layer 0, block i as layer i + 1 and everything after the blocks
    (norms, head) as layer depth + 1; a parameter of layer l trains at lr x layer_decay^(depth + 1 -
    l) (its group's "lr_scale"). No weight decay on biases, 1-D parameters and the tokens. Frozen
    parameters (a linear probe's) are left out."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_of(name, depth)
        decays = not (
            param.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
        )
        group = groups.setdefault((layer, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return list(groups.values())


def layer_of(name: str, depth: int) -> int:
    """A parameter's layer for lr decay: 0 for the embeddings, i + 1 for block i, depth + 1 after
    the blocks."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


class Lars(torch.optim.Optimizer):
    """LARS (You et al. 2017) as the linear probe uses it (appendix A.3): SGD with momentum whose
    update of each weight matrix is rescaled to trust_coefficient x |w| / |update|; biases and other
    1-D parameters get neither the rescaling nor weight decay."""

    def __init__(
        self,
        params: list[dict],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["trust_coefficient"] * param_norm / update_norm, 1.0)
                    update = update * trust
                state = self.state[param]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(param)
                momentum = state["momentum"].mul_(group["momentum"]).add_(update)
                param.add_(momentum, alpha=-group["lr"])


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, peak: float,
                    groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer over `groups` (default: `param_groups`). AdamW is torch's fused one
    (one kernel for every parameter's update). DeepSpeed wraps it: under ZeRO it steps this rank's
    partition, in bf16 mode the fp32 master copies."""
    groups = groups if groups is not None else param_groups(model, optim.weight_decay)
    if optim.optimizer == "lars":
        return Lars(groups, lr=peak, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=peak, betas=optim.betas, eps=1e-8, fused=True)
