"""MAE pre-training as a task of the trainer (He et al. 2021): the model, its loss on masks drawn from the run's
own noise stream, and two periodic jobs: the k-NN monitor of the encoder's features and the reconstruction figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch

from model import MaskedAutoencoderViT, load_reference_weights
from model.flops import mae_train_flops
from pipeline.errors import DataError
from pipeline.manifest import check_same_classes
from train.config import ConfigError, PretrainConfig
from train.engine import attention_backend, mae_from_config
from train.knn import KnnMonitor
from train.task import MicroBatch, PeriodicJob, RunContext, Task
from train.viz import fixed_images, fixed_noise, reconstruction_grid, save_reconstruction


class MaeTask(Task):
    config_type = PretrainConfig
    name = "MAE pre-training"
    needs_labels = False  # the loss reconstructs pixels

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        # Masks come from their own stream, so that a resume restores exactly the masks to come.
        self.noise = torch.Generator(device=ctx.device).manual_seed(self._noise_seed(step=0))
        self.model: MaskedAutoencoderViT | None = None

    def _noise_seed(self, step: int) -> int:
        """Seeds a rank's mask noise: a fresh run's, or one that continues on other ranks or other masks."""
        runtime = self.cfg.runtime
        return hash((runtime.seed, runtime.mask_seed, self.ctx.rank, step)) % (2**63)

    @staticmethod
    def model_shape(cfg: PretrainConfig) -> MaskedAutoencoderViT:
        return mae_from_config(cfg)

    def build_model(self, initialise: bool) -> MaskedAutoencoderViT:
        self.model = mae_from_config(self.cfg)
        init = self.cfg.model.init
        if init and initialise:
            if Path(init).is_dir():
                raise ConfigError(f"model.init {init} is a folder: pre-training starts from a weight file (write "
                                  "one from a run with `python -m train.export`)")
            report = self.ctx.agree(lambda: load_reference_weights(self.model, init))
            self.ctx.say(f"initialised from {init}: {report}")
        return self.model

    def flops_per_image(self, model: MaskedAutoencoderViT) -> int:
        return mae_train_flops(model, self.cfg.model.mask_ratio)

    def loss(self, engine: Any, images: torch.Tensor, labels: None, micro: MicroBatch) -> torch.Tensor:
        noise = torch.rand(images.shape[0], self.model.num_patches, device=self.ctx.device, generator=self.noise)
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
        """The k-NN monitor's two evaluation-mode loaders (the train memory, the held-out queries), or None without
        a held-out split of the train split's classes."""
        eval_cfg, ctx = self.cfg.eval, self.ctx
        try:
            check_same_classes(self.cfg.data.shards, "train", eval_cfg.split)
            return KnnMonitor(ctx.loader("train", train=False, limit=eval_cfg.train_samples or None),
                              ctx.loader(eval_cfg.split, train=False, limit=eval_cfg.val_samples or None))
        except (FileNotFoundError, DataError) as err:  # no held-out split, or one labelled with other classes
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
        began, cfg = time.perf_counter(), self.ctx.cfg
        # ZeRO-3 holds a slice of each parameter per rank: gather them for the evaluation forward.
        gathered = deepspeed.zero.GatheredParameters(list(self.model.parameters()), enabled=cfg.runtime.zero_stage == 3)
        autocast = torch.autocast(self.ctx.device.type, torch.bfloat16,
                                  enabled=cfg.runtime.precision == "autocast_bf16")

        def encode(images: torch.Tensor) -> torch.Tensor:
            with autocast, attention_backend(cfg.runtime.attention):
                return self.model.forward_features(images.to(self.ctx.dtype))

        with gathered, torch.no_grad():
            result = self.monitor(encode, self.ctx.device, cfg.eval.k, cfg.eval.temperature)
        self.ctx.metrics.record({"step": step, "epoch": finished_epochs, **result,
                                 "eval_s": time.perf_counter() - began})
        self.ctx.say(f"k-NN top-1 at step {step}: {100 * result['knn_top1_cls']:.1f}% (cls token), "
                     f"{100 * result['knn_top1_patch_mean']:.1f}% (mean patch token); {result['knn_train_samples']} "
                     f"train / {result['knn_val_samples']} {cfg.eval.split} samples")


class ReconstructionJob(PeriodicJob):
    """The paper's figure on fixed images and masks: every rank runs the forward (ZeRO-3 gathers weights
    collectively); rank 0 writes the PNG and its loss."""

    name = "reconstruction"
    runs_when_stopped = True

    def __init__(self, ctx: RunContext, engine: Any, model: MaskedAutoencoderViT) -> None:
        super().__init__(ctx.cfg.log.viz_every)
        self.ctx, self.engine, self.model = ctx, engine, model

    def run(self, step: int, finished_epochs: int) -> None:
        cfg, ctx = self.ctx.cfg, self.ctx
        images = fixed_images(cfg.data.shards, cfg.data.viz_split, cfg.log.viz_images, cfg.data.img_size,
                              ctx.device, synthetic=cfg.data.backend == "synthetic")
        noise = fixed_noise(images.shape[0], self.model.num_patches, ctx.device)
        self.engine.eval()
        with torch.no_grad():
            loss, pred, mask = self.engine(images.to(ctx.dtype), mask_ratio=cfg.model.mask_ratio, noise=noise)
        self.engine.train()
        if ctx.is_main:
            picture = reconstruction_grid(self.model, images, pred, mask)
            path = save_reconstruction(picture, ctx.output / "viz", step)
            with open(ctx.output / "viz" / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": float(loss), "image": path.name}) + "\n")
            ctx.metrics.image("reconstruction", picture, step)
            ctx.say(f"reconstruction {path} (loss {float(loss):.4f} on the fixed images)")
