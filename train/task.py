"""What a task is to the trainer (`train.trainer`): the trainer owns the loop, the checkpoints, the
logs and the run's health; a task owns its model, the loss of a batch (with its own random streams)
and its periodic jobs.

A new objective (say, distillation) is one new file: a `Task` subclass with its config type, and a
`__main__` that hands it to `train.launch.main`, as train/pretrain.py and train/finetune.py do.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import deepspeed
import torch
from torch import nn

from pipeline import Loader, build_loader
from pipeline.augment import PRETRAIN, Augmentation
from train.cadence import EveryEpochs, EverySteps
from train.config import ConfigError, RunConfig
from train.distributed import agree
from train.engine import engine_args
from train.metrics import MetricsLog
from train.recipe import BatchPlan, build_optimizer

T = TypeVar("T")


@dataclass(frozen=True)
class RunContext:
    """What a task may use of the run it is part of (built by the trainer before the task)."""

    cfg: RunConfig
    device: torch.device
    rank: int
    world_size: int
    plan: BatchPlan
    dtype: torch.dtype
    """the images' dtype: bf16 for bf16 weights, else fp32 (under autocast as in the reference
    code)"""
    control: Any
    """the CPU side-channel process group (gloo): votes and refusals, no device sync"""
    metrics: MetricsLog
    say: Callable[[str], None]
    """rank 0 prints a line without breaking the progress bar"""
    resources: contextlib.ExitStack
    """the run's resources, released in reverse order on every path out of it: enter what a task
    opens here"""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def output(self) -> Path:
        return Path(self.cfg.output)

    @property
    def loader_device(self) -> str:
        """Where this rank's loaders decode and deliver: "gpu" (DALI's mixed decoding) on a CUDA
        rank, else "cpu"."""
        return "gpu" if self.device.type == "cuda" else "cpu"

    def agree(self, work: Callable[[], T]) -> T:
        """`work` on every rank; refused on any rank, refused on all (train.distributed.agree)."""
        return agree(work, self.control)

    def frozen_model(self, model: nn.Module) -> nn.Module:
        """A model the run uses and does not train (a teacher to distil from): no gradients, in eval
        mode, on this rank's device in the images' dtype; under ZeRO-3 its weights partitioned over
        the ranks as the trained model's are (DeepSpeed's engine, returned in the model's place,
        gathers a module's weights around that module's own forward pass: call the model, not
        another method of it)."""
        model.requires_grad_(False).eval()
        if self.cfg.runtime.zero_stage != 3:
            return model.to(self.device, self.dtype)
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.plan.local_batch_size,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": self.dtype == torch.bfloat16},
        }
        engine, *_ = deepspeed.initialize(args=engine_args(self.device), model=model, config=config)
        engine.eval()
        self.resources.callback(engine.destroy)
        return engine

    def loader(
        self,
        split: str,
        *,
        train: bool,
        augment: Augmentation = PRETRAIN,
        limit: int | None = None,
        labels: bool = True,
        verbose: bool = False,
    ) -> Loader:
        """A loader of this run's shards for this rank: the one place the run's loader settings are
        written."""
        data = self.cfg.data
        loader = build_loader(
            data.shards,
            split=split,
            local_batch_size=self.plan.local_batch_size,
            img_size=data.img_size,
            train=train,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.cfg.runtime.seed,
            device=self.loader_device,
            backend=data.backend,
            num_threads=data.num_threads or None,
            dtype=self.dtype,
            synthetic_samples=data.synthetic_samples,
            limit=limit,
            augment=augment,
            labels=labels,
            window_shards=data.window_shards,
            verbose=verbose,
        )
        self.resources.callback(loader.close)
        return loader


@dataclass(frozen=True)
class MicroBatch:
    """Where a local batch falls in the run: `step` optimizer steps are done before it, and it is
    forward pass `index` of the next one's gradient accumulation."""

    step: int
    index: int


class PeriodicJob(ABC):
    """Work a task does every few epochs or every few optimizer steps, and at the end of a run (an
    evaluation, a picture, an EMA update of a teacher). `name` is what hang reports and logs call
    it."""

    name: ClassVar[str]
    runs_when_stopped: ClassVar[bool] = False
    """also at the end of a run a signal stopped (cheap work a user wants to see then)"""

    def __init__(self, every_epochs: int = 0, every_steps: int = 0) -> None:
        """Due after every `every_epochs`-th epoch and after every `every_steps`-th optimizer step
        (0: never)."""
        self.epochs, self.steps = EveryEpochs(every_epochs), EverySteps(every_steps)
        self.last_step = -1  # the step of its last run: no due point runs it twice

    def due_after_epoch(self, finished_epochs: int) -> bool:
        return self.epochs.due(finished_epochs)

    def due_after_step(self, step: int) -> bool:
        return self.steps.due(step)

    @abstractmethod
    def run(self, step: int, finished_epochs: int) -> None:
        """Collective: every rank calls it, after optimizer step `step`."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to continue the job as an unbroken run would (the same on every
        rank)."""
        return {}

    # optional, as state_dict
    def load_state_dict(self, state: dict[str, Any] | None) -> None:  # noqa: B027
        """`state` None: the checkpoint holds none of this job (one a resume switched on): it starts
        afresh."""


class Task(ABC):
    """One training objective. The trainer calls, in order: `build_model`, `build_optimizer`, then
    per forward pass `loss`; `jobs` once the engine exists; `rank_state_dict`/`load_rank_state_dict`
    around checkpoints.

    A task says here all that the rest of maeflow asks of it, so that a new one is one file
    (`train.launch`)."""

    config_type: ClassVar[type[RunConfig]]
    """its config: the sections every task has and its own; `config_type.TASK` is its presets'
    `task` line"""
    name: ClassVar[str]
    """what the start-up line calls it ("MAE pre-training")"""
    script: ClassVar[str]
    """the command that runs it, as messages name it ("train/pretrain.py")"""
    example_preset: ClassVar[str]
    """a preset of its own, named in --config's help"""
    fixed_on_resume: ClassVar[tuple[str, ...]] = ()
    """its own config keys a resume may not change (beyond the model's shape and the data order
    every task keeps)"""

    def __init__(self, ctx: RunContext) -> None:
        """Checks that may refuse the run belong here, reading only: nothing has been written
        yet."""
        self.ctx = ctx
        self.cfg = ctx.cfg

    @property
    def augmentation(self) -> Augmentation:
        """What the training loader does to each image."""
        return PRETRAIN

    needs_labels: ClassVar[bool] = True
    """whether `loss` reads the labels (False: the training loader reads and moves none, and passes
    None)"""

    @abstractmethod
    def build_model(self, initialise: bool) -> nn.Module:
        """The model to train (on the CPU; the engine moves it); `initialise`: load model.init (not
        when a checkpoint will be loaded into it)."""

    def build_optimizer(self, model: nn.Module, peak_lr: float) -> torch.optim.Optimizer:
        return build_optimizer(model, self.cfg.optim, peak_lr)

    @staticmethod
    @abstractmethod
    def model_shape(cfg: RunConfig) -> nn.Module:
        """The model `cfg` trains, uninitialised and reading no data or weights (`--print-config`
        builds it on the meta device to size checkpoints: a split's class count falls back to
        ImageNet's where no data is given)."""

    @abstractmethod
    def flops_per_image(self, model: nn.Module) -> int:
        """Matmul FLOPs of one training image, forward and backward (for MFU)."""

    @abstractmethod
    def loss(self, engine: Any, images: torch.Tensor, labels: torch.Tensor | None,
             micro: MicroBatch) -> torch.Tensor:
        """The scalar loss of one local batch, through `engine` (DeepSpeed's wrapped model)."""

    def jobs(self, engine: Any, model: nn.Module) -> list[PeriodicJob]:
        return []

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's random streams, kept in its checkpoint file."""
        return {}

    def evaluate(self, weights: Path) -> dict[str, Any]:
        """Collective: the task's evaluation of a weight file, without training (`--eval`)."""
        raise ConfigError(f"{self.name} has no evaluation of a weight file (--eval)")

    def load_rank_state_dict(self, state: dict[str, Any] | None, step: int, reseed: bool) -> None:  # noqa: B027
        """`state` None (another rank count) or `reseed` (the config changed a stream's seed): draw
        afresh from `step` on."""


def run_job(job: PeriodicJob, monitor: Any, step: int, finished_epochs: int) -> None:
    """Collective: a periodic job after optimizer step `step`, once however many due points fall
    there (an epoch's end and a step count, the run's end), in a slow phase named as the job itself
    (what a hang report says it was in). `monitor`: the run's (`train.monitor.RunMonitor`)."""
    if job.last_step == step:
        return
    with monitor.slow_phase(job.name):
        job.run(step, finished_epochs)
    job.last_step = step
