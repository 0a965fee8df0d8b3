"""MAE pre-training as a task of the trainer (He et al. 2021): the model, its loss on masks drawn
from the run's own noise stream, and two periodic jobs: the k-NN monitor of the encoder's features
and the reconstruction figure.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from model import KernelChoice, MaskedAutoencoderViT, build_mae, load_reference_weights
from model.flops import mae_train_flops
from pipeline.errors import DataError
from pipeline.manifest import check_same_classes
from pipeline.seeds import stream_seed
from train.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    setting,
)
from train.engine import evaluating
from train.knn import KnnMonitor, knn_top1
from train.task import MicroBatch, PeriodicJob, RunContext, Task
from train.viz import fixed_images, fixed_noise, reconstruction_grid, save_reconstruction


@dataclass
class MaeModelConfig(ModelConfig):
    norm_pix_loss: bool = setting(
        True, "regress per-patch normalized pixels (the paper's best setting)")
    mask_ratio: float = setting(0.75, "fraction of patches removed from each image")


@dataclass
class MaeDataConfig(DataConfig):
    viz_split: str = setting(
        "val", "split holding the fixed reconstruction images (falls back to train if absent)")


@dataclass
class MaeRuntimeConfig(RuntimeConfig):
    mask_seed: int = setting(
        0, "seeds the masks; a --resume with another value draws other masks from there on (a "
        "loss-spike remedy)")
    kernels: KernelChoice = setting(
        "auto", "masking and loss: auto (Triton where it runs, checked at start), triton (insist) "
        "or torch (references)")


@dataclass
class MaeLogConfig(LogConfig):
    viz_every: int = setting(
        20, "epochs between reconstruction images (one is always written at the end)")
    viz_images: int = setting(4, "images in the reconstruction grid")


@dataclass
class KnnConfig(EvalConfig):
    train_samples: int = setting(
        100_000, "train-split samples embedded as the k-NN memory (0 = all)")
    val_samples: int = setting(0, "held-out samples classified (0 = all)")
    k: int = setting(20, "neighbours voting")
    temperature: float = setting(0.07, "votes are weighted exp(cosine similarity / temperature)")


@dataclass
class PretrainConfig(RunConfig):
    """MAE pre-training (train/pretrain.py)."""

    TASK: ClassVar[str] = "pretrain"
    model: MaeModelConfig = field(default_factory=MaeModelConfig)
    data: MaeDataConfig = field(default_factory=MaeDataConfig)
    runtime: MaeRuntimeConfig = field(default_factory=MaeRuntimeConfig)
    log: MaeLogConfig = field(default_factory=MaeLogConfig)
    eval: KnnConfig = field(default_factory=KnnConfig)

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (
                0 <= self.model.mask_ratio < 1,
                f"model.mask_ratio must be in [0, 1), got {self.model.mask_ratio}",
            ),
            (self.log.viz_images >= 1, "log.viz_images must be >= 1"),
            (self.log.viz_every >= 1, "log.viz_every must be >= 1"),
            (
                min(self.eval.train_samples, self.eval.val_samples) >= 0
                and self.eval.k >= 1
                and self.eval.temperature > 0,
                "eval.train_samples and eval.val_samples must be >= 0, eval.k >= 1 and "
                "eval.temperature > 0",
            ),
        ]


def mae_from_config(cfg: PretrainConfig) -> MaskedAutoencoderViT:
    """The MAE a pre-training config describes: its preset at the loader's resolution, with its loss
    and kernels."""
    model = build_mae(
        cfg.model.name, img_size=cfg.data.img_size, norm_pix_loss=cfg.model.norm_pix_loss
    )
    model.kernels = cfg.runtime.kernels
    return model


class MaeTask(Task):
    config_type = PretrainConfig
    name = "MAE pre-training"
    script = "train/pretrain.py"
    example_preset = "vit_h14_1600ep"
    needs_labels = False  # the loss reconstructs pixels

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        # Masks come from their own stream, so that a resume restores exactly the masks to come.
        self.noise = torch.Generator(device=ctx.device).manual_seed(self._noise_seed(step=0))
        self.model: MaskedAutoencoderViT | None = None

    def _noise_seed(self, step: int) -> int:
        """Seeds a rank's mask noise: a fresh run's, or one that continues on other ranks or other
        masks."""
        runtime = self.cfg.runtime
        return stream_seed(runtime.seed, "mask noise", runtime.mask_seed, self.ctx.rank, step)

    @staticmethod
    def model_shape(cfg: PretrainConfig) -> MaskedAutoencoderViT:
        return mae_from_config(cfg)

    def build_model(self, initialise: bool) -> MaskedAutoencoderViT:
        self.model = mae_from_config(self.cfg)
        init = self.cfg.model.init
        if init and initialise:
            if Path(init).is_dir():
                raise ConfigError(
                    f"model.init {init} is a folder: pre-training starts from a weight file (write "
                    "one from a run with `python -m train.export`)"
                )
            report = self.ctx.agree(lambda: load_reference_weights(self.model, init))
            self.ctx.say(f"initialised from {init}: {report}")
        return self.model

    def flops_per_image(self, model: MaskedAutoencoderViT) -> int:
        return mae_train_flops(model, self.cfg.model.mask_ratio)

    def loss(
        self, engine: Any, images: torch.Tensor, labels: None, micro: MicroBatch
    ) -> torch.Tensor:
        noise = torch.rand(
            images.shape[0], self.model.num_patches, device=self.ctx.device, generator=self.noise
        )
        loss, _, _ = engine(images, mask_ratio=self.cfg.model.mask_ratio, noise=noise)
        return loss

    def jobs(self, engine: Any, model: MaskedAutoencoderViT) -> list[PeriodicJob]:
        jobs: list[PeriodicJob] = [ReconstructionJob(self.ctx, engine, model)]
        if self.cfg.eval.every_epochs and self.cfg.data.backend != "synthetic":
            monitor = self._knn_monitor()
            if monitor is not None:
                jobs.insert(0, KnnJob(self.ctx, model, monitor))
        return jobs

    def _knn_monitor(self) -> KnnMonitor | None:
        """The k-NN monitor's two evaluation-mode loaders (the train memory, the held-out queries),
        or None without a held-out split of the train split's classes."""
        eval_cfg, ctx = self.cfg.eval, self.ctx
        try:
            check_same_classes(self.cfg.data.shards, "train", eval_cfg.split)
            return KnnMonitor(
                ctx.loader("train", train=False, limit=eval_cfg.train_samples or None),
                ctx.loader(eval_cfg.split, train=False, limit=eval_cfg.val_samples or None),
            )
        # no held-out split, or one labelled with other classes
        except (FileNotFoundError, DataError) as err:
            ctx.say(f"k-NN evaluation off: {str(err).splitlines()[0]}")
            return None

    def rank_state_dict(self) -> dict[str, Any]:
        return {"noise_rng": self.noise.get_state()}

    def load_rank_state_dict(self, state: dict[str, Any] | None, step: int, reseed: bool) -> None:
        if state is not None and state.get("noise_rng") is not None and not reseed:
            self.noise.set_state(state["noise_rng"])
        else:  # another rank count or another mask seed: masks drawn afresh from here
            self.noise.manual_seed(self._noise_seed(step))


class KnnJob(PeriodicJob):
    """Every rank embeds its share; rank 0 records the k-NN top-1 of both feature kinds."""

    name = "k-NN evaluation"

    def __init__(self, ctx: RunContext, model: MaskedAutoencoderViT, monitor: KnnMonitor) -> None:
        super().__init__(ctx.cfg.eval.every_epochs)
        self.ctx, self.model, self.monitor = ctx, model, monitor

    def run(self, step: int, finished_epochs: int) -> None:
        began, ctx = time.perf_counter(), self.ctx

        def encode(images: torch.Tensor) -> torch.Tensor:
            return self.model.forward_features(images.to(ctx.dtype))

        with evaluating(self.model, ctx.cfg.runtime, ctx.device):
            memory, queries = self.monitor.embed(encode, ctx.device)
        # in fp32, as the features
        result = knn_top1(memory, queries, ctx.cfg.eval.k, ctx.cfg.eval.temperature)
        ctx.metrics.record(
            {
                "step": step,
                "epoch": finished_epochs,
                **result,
                "eval_s": time.perf_counter() - began,
            }
        )
        ctx.say(
            f"k-NN top-1 at step {step}: {100 * result['knn_top1_cls']:.1f}% (cls token), "
            f"{100 * result['knn_top1_patch_mean']:.1f}% (mean patch token); "
            f"{result['knn_train_samples']} train / {result['knn_val_samples']} "
            f"{ctx.cfg.eval.split} samples"
        )


class ReconstructionJob(PeriodicJob):
    """The paper's figure on fixed images and masks: every rank runs the forward (ZeRO-3 gathers
    weights collectively); rank 0 writes the PNG and its loss."""

    name = "reconstruction"
    runs_when_stopped = True

    def __init__(self, ctx: RunContext, engine: Any, model: MaskedAutoencoderViT) -> None:
        super().__init__(ctx.cfg.log.viz_every)
        self.ctx, self.engine, self.model = ctx, engine, model

    def run(self, step: int, finished_epochs: int) -> None:
        cfg, ctx = self.ctx.cfg, self.ctx
        images = fixed_images(
            cfg.data.shards,
            cfg.data.viz_split,
            cfg.log.viz_images,
            cfg.data.img_size,
            ctx.device,
            synthetic=cfg.data.backend == "synthetic",
        )
        noise = fixed_noise(images.shape[0], self.model.num_patches, ctx.device)
        with evaluating(self.engine, cfg.runtime, ctx.device, gather=False):
            loss, pred, mask = self.engine(
                images.to(ctx.dtype), mask_ratio=cfg.model.mask_ratio, noise=noise
            )
        if ctx.is_main:
            picture = reconstruction_grid(self.model, images, pred, mask)
            path = save_reconstruction(picture, ctx.output / "viz", step)
            with open(ctx.output / "viz" / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": float(loss), "image": path.name}) + "\n")
            ctx.metrics.image("reconstruction", picture, step)
            ctx.say(f"reconstruction {path} (loss {float(loss):.4f} on the fixed images)")
