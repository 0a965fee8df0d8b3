"""A third task, written as a user writes one, in one file and a preset (`distill_tiny.toml` beside
it), touching no other module: feature distillation. A small ViT student learns to give a frozen MAE
teacher's encoder tokens; a job every few optimizer steps records how close they are on fixed
images. It is neither pre-training nor fine-tuning: its config section, its model, its loss, its
frozen model and its per-step job are its own.

    python tests/scripts/distill_task.py --config tests/scripts/distill_tiny.toml --output
    runs/distill [--resume]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if __package__ in (None, ""):  # run as a script: import from the repository
    sys.path[0] = str(Path(__file__).resolve().parent.parent.parent)

import torch
import torch.nn.functional as F
from torch import nn

from model import PRESETS, MaskedAutoencoderViT, load_reference_weights
from model.vit import build_classifier
from pipeline.seeds import stream_seed
from train import launch
from train.config import RunConfig, setting
from train.task import MicroBatch, PeriodicJob, RunContext, Task


@dataclass
class DistillRecipe:
    teacher: str = setting(
        "", "the teacher's weights (an MAE file; empty: the teacher as initialised)"
    )
    report_every_steps: int = setting(
        2, "optimizer steps between the teacher-student similarity records"
    )


@dataclass
class DistillConfig(RunConfig):
    """Feature distillation (tests/scripts/distill_task.py)."""

    TASK: ClassVar[str] = "distill"
    distill: DistillRecipe = field(default_factory=DistillRecipe)

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.distill.report_every_steps >= 1, "distill.report_every_steps must be >= 1")]


class Student(nn.Module):
    """A ViT whose forward pass gives its encoder tokens, what the teacher's are compared with."""

    def __init__(self, cfg: DistillConfig) -> None:
        super().__init__()
        self.vit = build_classifier(cfg.model.name, cfg.data.img_size, num_classes=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)


class Teacher(MaskedAutoencoderViT):
    """The MAE whose forward pass gives its encoder tokens: under ZeRO-3, DeepSpeed gathers a
    module's weights around its own forward pass, so a frozen model is called, not asked for another
    method."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_features(images)


def teacher_of(cfg: DistillConfig) -> nn.Module:
    """The teacher: its weights file, or its initial weights drawn from the run's own stream (the
    same in a resumed run, which does not checkpoint a model it does not train)."""
    with torch.random.fork_rng():
        torch.manual_seed(stream_seed(cfg.runtime.seed, "teacher"))
        teacher = Teacher(img_size=cfg.data.img_size, **PRESETS[cfg.model.name])
    if cfg.distill.teacher:
        load_reference_weights(teacher, cfg.distill.teacher)
    return teacher


class SimilarityJob(PeriodicJob):
    name = "teacher-student similarity"

    def __init__(self, ctx: RunContext, engine: Any, teacher: nn.Module) -> None:
        super().__init__(every_steps=ctx.cfg.distill.report_every_steps)
        self.ctx, self.engine, self.teacher = ctx, engine, teacher
        self.images = torch.randn(
            4,
            3,
            ctx.cfg.data.img_size,
            ctx.cfg.data.img_size,
            generator=torch.Generator().manual_seed(0),
        ).to(ctx.device, ctx.dtype)
        self.reports = 0

    def run(self, step: int, finished_epochs: int) -> None:
        with torch.no_grad():
            similarity = F.cosine_similarity(
                self.engine(self.images), self.teacher(self.images), dim=-1
            ).mean()
        self.reports += 1
        self.ctx.metrics.record(
            {"step": step, "similarity": float(similarity), "reports": self.reports}
        )

    def state_dict(self) -> dict[str, Any]:
        return {"reports": self.reports}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.reports = 0 if state is None else state["reports"]


class DistillTask(Task):
    config_type = DistillConfig
    name = "feature distillation"
    script = "tests/scripts/distill_task.py"
    example_preset = "tests/scripts/distill_tiny.toml"
    fixed_on_resume = ("distill.teacher",)  # another teacher would be another objective
    needs_labels = False

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.teacher = ctx.frozen_model(teacher_of(self.cfg))

    @staticmethod
    def model_shape(cfg: DistillConfig) -> nn.Module:
        return Student(cfg)

    def build_model(self, initialise: bool) -> nn.Module:
        return Student(self.cfg)

    def flops_per_image(self, model: nn.Module) -> int:
        return 0  # no MFU for this toy

    def loss(
        self, engine: Any, images: torch.Tensor, labels: None, micro: MicroBatch
    ) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(images)
        return F.mse_loss(engine(images).float(), target.float())

    def jobs(self, engine: Any, model: nn.Module) -> list[PeriodicJob]:
        return [SimilarityJob(self.ctx, engine, self.teacher)]


if __name__ == "__main__":
    sys.exit(launch.main(DistillTask))
