"""Fine-tuning and the linear probe of a pre-trained MAE encoder as a task of the trainer (He et al.
2021, appendix A.2 and A.3): the ViT classifier, its recipe's optimizer groups, the batch
augmentation and soft-target loss, and the top-1/top-5 evaluation that keeps the best weights as
OUTPUT/best.pth.

Every random draw of a step (erasing, mixing, drop path) comes from the task's own streams, seeded
by the run's stream "batch augmentation" at (rank, step, micro-batch) alone (`pipeline.seeds`): a
resumed run augments exactly as an unbroken one, on any rank count, with nothing to save.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.flops import classifier_train_flops
from model.vit import VisionTransformer, build_classifier, load_encoder
from model.weights import WeightsError, read_weights
from pipeline import Loader
from pipeline.atomic import atomic_path
from pipeline.augment import Augmentation
from pipeline.batch_augment import MixConfig, draw_mix, mix_batch, random_erase, smooth_targets
from pipeline.formats import stamp
from pipeline.manifest import check_same_classes, resolve_shards
from pipeline.seeds import stream_seed
from pipeline.synthetic_loader import IMAGENET_CLASSES, SYNTHETIC_CLASSES
from train.config import ConfigError, RunConfig, RuntimeConfig, config_from_json, setting
from train.engine import evaluating
from train.export import consolidated_state_dict
from train.recipe import build_optimizer, layer_decay_groups
from train.task import MicroBatch, PeriodicJob, RunContext, Task

BEST_WEIGHTS = "best.pth"


@dataclass
class ClassifierRecipe:
    """The [finetune] section (He et al. 2021, appendix A.2 and A.3)."""

    mode: Literal["finetune", "linear_probe"] = setting(
        "finetune", "finetune (every weight trains, pooled patch tokens) or linear_probe (frozen "
        "encoder, class token, BN + head)")
    num_classes: int = setting(
        0, "classes of the head; 0 = the train split's classes (its manifest)")
    layer_decay: float = setting(
        0.75, "layer-wise lr decay: block i of d trains at lr x layer_decay^(d - i), the "
        "embeddings at ^(d + 1); 1 = off")
    drop_path: float = setting(
        0.1, "stochastic depth of the last block (rising linearly from 0 at the first)")
    label_smoothing: float = setting(0.1, "target mass spread evenly over all classes")
    mixup_alpha: float = setting(0.8, "mixup's Beta(alpha, alpha) mixing weight (0 = off)")
    cutmix_alpha: float = setting(1.0, "cutmix's Beta(alpha, alpha) kept area (0 = off)")
    mix_switch_prob: float = setting(
        0.5, "with mixup and cutmix on: the probability a batch uses cutmix")
    rand_augment_layers: int = setting(
        2, "RandAugment ops per image, each applied with probability 0.5 (0 = off)")
    rand_augment_magnitude: int = setting(9, "RandAugment level of every op, of 10")
    erase_prob: float = setting(0.25, "probability an image gets a random-erasing box of noise")
    crop_min_scale: float = setting(0.08, "smallest area fraction of the random resized crop")


@dataclass
class FinetuneConfig(RunConfig):
    """Fine-tuning and the linear probe (train/finetune.py)."""

    TASK: ClassVar[str] = "finetune"
    finetune: ClassifierRecipe = field(default_factory=ClassifierRecipe)

    def checks(self) -> list[tuple[bool, str]]:
        ft = self.finetune
        return [
            (
                ft.num_classes >= 0
                and ft.layer_decay > 0
                and 0 <= ft.drop_path < 1
                and 0 <= ft.label_smoothing < 1
                and min(ft.mixup_alpha, ft.cutmix_alpha) >= 0
                and 0 <= ft.mix_switch_prob <= 1
                and 0 <= ft.erase_prob <= 1
                and ft.rand_augment_layers >= 0
                and 0 <= ft.rand_augment_magnitude <= 10
                and 0 < ft.crop_min_scale <= 1,
                "finetune: num_classes >= 0, layer_decay > 0, drop_path and label_smoothing in "
                "[0, 1), mixup_alpha and cutmix_alpha >= 0, mix_switch_prob and erase_prob in [0, "
                "1], rand_augment_layers >= 0, rand_augment_magnitude in [0, 10], crop_min_scale "
                "in (0, 1]",
            )
        ]


class ClassifierTask(Task):
    config_type = FinetuneConfig
    name = "fine-tuning"
    script = "train/finetune.py"
    example_preset = "finetune_vit_b16"
    fixed_on_resume = ("finetune.mode", "finetune.num_classes")  # the head's shape, what trains

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        cfg = self.cfg
        self.probe = cfg.finetune.mode == "linear_probe"
        self.num_classes = ctx.agree(lambda: class_count(cfg))
        self.mix = mix_config(cfg.finetune)
        self.val_loader = (
            ctx.agree(self._val_loader)
            if cfg.eval.every_epochs and cfg.data.backend != "synthetic"
            else None
        )
        # The task's random streams: host draws (boxes, mixing) from numpy, pixel noise and drop
        # path on the device.
        self.erase_noise = torch.Generator(device=ctx.device)
        self.drop_path = torch.Generator(device=ctx.device)

    @property
    def augmentation(self) -> Augmentation:
        return image_augmentation(self.cfg.finetune)

    def _val_loader(self) -> Loader | None:
        """The held-out split's loader (every image once over the ranks), or None without one."""
        cfg = self.cfg
        try:
            resolve_shards(cfg.data.shards, cfg.eval.split)
        except FileNotFoundError as err:
            self.ctx.say(f"evaluation off: {str(err).splitlines()[0]}")
            return None
        check_same_classes(cfg.data.shards, "train", cfg.eval.split)
        return self.ctx.loader(cfg.eval.split, train=False)

    @staticmethod
    def model_shape(cfg: FinetuneConfig) -> VisionTransformer:
        given = cfg.data.shards or cfg.data.backend == "synthetic"
        return classifier(
            cfg, class_count(cfg) if given else cfg.finetune.num_classes or IMAGENET_CLASSES
        )

    def build_model(self, initialise: bool) -> VisionTransformer:
        cfg = self.cfg
        model = classifier(cfg, self.num_classes)
        model.set_drop_path_generator(self.drop_path)
        if cfg.model.init and initialise:
            state = self.ctx.agree(lambda: pretrained_weights(cfg.model.init, cfg.model.name))
            fresh = self.ctx.agree(lambda: load_encoder(model, state, cfg.model.init))
            self.ctx.say(
                f"initialised from {cfg.model.init}; trained from scratch: "
                f"{', '.join(fresh) or 'nothing'}"
            )
        return model

    def build_optimizer(self, model: VisionTransformer, peak_lr: float) -> torch.optim.Optimizer:
        layer_decay = 1.0 if self.probe else self.cfg.finetune.layer_decay
        groups = layer_decay_groups(model, model.depth, self.cfg.optim.weight_decay, layer_decay)
        return build_optimizer(model, self.cfg.optim, peak_lr, groups)

    def flops_per_image(self, model: VisionTransformer) -> int:
        return classifier_train_flops(model, trains_encoder=not self.probe)

    def loss(
        self, engine: Any, images: torch.Tensor, labels: torch.Tensor, micro: MicroBatch
    ) -> torch.Tensor:
        """Cross-entropy against soft targets: erased, mixed images with smoothed labels (the probe:
        neither)."""
        ft = self.cfg.finetune
        seed = stream_seed(
            self.cfg.runtime.seed, "batch augmentation", self.ctx.rank, micro.step, micro.index
        )
        self.drop_path.manual_seed(seed)
        if self.probe:
            targets = smooth_targets(labels, self.num_classes, 0.0)
        else:
            rng = np.random.default_rng(seed)
            if ft.erase_prob:
                images = random_erase(
                    images, ft.erase_prob, rng, self.erase_noise.manual_seed(seed)
                )
            if self.mix.mixing:
                draw = draw_mix(rng, *images.shape[2:], self.mix)
                images, targets = mix_batch(
                    images, labels, draw, self.num_classes, ft.label_smoothing
                )
            else:
                targets = smooth_targets(labels, self.num_classes, ft.label_smoothing)
        return F.cross_entropy(engine(images).float(), targets)  # targets are class probabilities

    def jobs(self, engine: Any, model: VisionTransformer) -> list[PeriodicJob]:
        return (
            [Top1Job(self.ctx, engine, model, self.val_loader)]
            if self.val_loader is not None
            else []
        )

    def evaluate(self, weights: Path) -> dict[str, Any]:
        """Collective: what the run's own evaluation measures, for a classifier weight file
        (`best.pth`, a `train.export` of a fine-tuning run, the reference's checkpoint) on the val
        split."""
        loader = self.val_loader or self.ctx.agree(self._val_loader)
        if loader is None:
            raise ConfigError(
                f"{self.cfg.data.shards} has no {self.cfg.eval.split} split to evaluate on"
            )
        model = self.build_model(initialise=False)
        untrained = self.ctx.agree(lambda: load_encoder(model, read_weights(weights), str(weights)))
        if untrained:
            raise WeightsError(
                f"{weights} is not a classifier of this config: it lacks {', '.join(untrained)}"
            )
        # the images' dtype: bf16 only for bf16 weights
        model = model.to(self.ctx.device, self.ctx.dtype)
        return evaluate_classifier(model, loader, self.cfg.runtime, self.ctx.device, gather=False)


class Top1Job(PeriodicJob):
    """Top-1, top-5 and the loss over every val image once (all ranks); the best weights so far are
    kept apart as OUTPUT/best.pth, and the best top-1 is the job's state (a resume continues from
    it)."""

    name = "top-1 evaluation"

    def __init__(
        self, ctx: RunContext, engine: Any, model: VisionTransformer, val_loader: Loader
    ) -> None:
        super().__init__(ctx.cfg.eval.every_epochs)
        self.ctx, self.engine, self.model, self.val_loader = ctx, engine, model, val_loader
        self.best_top1 = -1.0

    def state_dict(self) -> dict[str, Any]:
        return {"best_top1": self.best_top1}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.best_top1 = -1.0 if state is None else state["best_top1"]

    def run(self, step: int, finished_epochs: int) -> None:
        began, ctx = time.perf_counter(), self.ctx
        result = evaluate_classifier(
            self.engine, self.val_loader, ctx.cfg.runtime, ctx.device, gather=False
        )
        ctx.metrics.record(
            {
                "step": step,
                "epoch": finished_epochs,
                **result,
                "eval_s": time.perf_counter() - began,
            }
        )
        top1, top5 = result["top1"], result["top5"]
        best = top1 > self.best_top1
        if best:
            self.best_top1 = top1
            self._save_best({"step": step, "epoch": finished_epochs, "top1": top1, "top5": top5})
        kept = f"; the best so far: {ctx.output / BEST_WEIGHTS}" if best else ""
        ctx.say(
            f"{ctx.cfg.eval.split} top-1 {100 * top1:.2f}%, top-5 {100 * top5:.2f}% at step {step} "
            f"({result['val_samples']} images){kept}"
        )

    def _save_best(self, result: dict) -> None:
        """OUTPUT/best.pth, written atomically by rank 0 (ZeRO-3 gathers the weights on every rank
        first)."""
        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(
            params, enabled=self.ctx.cfg.runtime.zero_stage == 3
        ):
            if self.ctx.is_main:
                state = {
                    k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()
                }
                with atomic_path(self.ctx.output / BEST_WEIGHTS) as tmp:
                    provenance = stamp("weights", {**result, "config": self.ctx.cfg.to_dict()})
                    torch.save({"model": state, "maeflow": provenance}, tmp)


def evaluate_classifier(model: Any, loader: Loader, runtime: RuntimeConfig, device: torch.device,
                        gather: bool) -> dict[str, Any]:
    """Collective: top-1, top-5 and the mean loss of `model` (a module, or DeepSpeed's engine:
    `gather` False) over every image `loader` gives the ranks together, and how many there were."""
    # top-1 hits, top-5 hits, images, loss
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    loader.set_epoch(0)
    with evaluating(model, runtime, device, gather):
        for images, labels in loader:
            logits = model(images).float()
            top1, top5 = top_hits(logits, labels)
            totals += torch.stack([top1, top5, labels.new_tensor(len(labels)),
                                   F.cross_entropy(logits, labels, reduction="sum")]).to(totals)
    dist.all_reduce(totals)
    images = float(totals[2])
    return {"top1": float(totals[0]) / images, "top5": float(totals[1]) / images,
            "val_loss": float(totals[3]) / images, "val_samples": int(images)}


def mix_config(ft: ClassifierRecipe) -> MixConfig:
    """The batch mixing and label smoothing the config asks for."""
    return MixConfig(ft.mixup_alpha, ft.cutmix_alpha, ft.mix_switch_prob, ft.label_smoothing)


def image_augmentation(ft: ClassifierRecipe) -> Augmentation:
    """What the training loader does to each image: the crop, the flip and (not in the probe)
    RandAugment."""
    layers = 0 if ft.mode == "linear_probe" else ft.rand_augment_layers
    return Augmentation(crop_scale=(ft.crop_min_scale, 1.0), rand_augment_layers=layers,
                        rand_augment_magnitude=ft.rand_augment_magnitude)


def top_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of the batch the top class, and any of the top 5 (all, with fewer classes), got
    right."""
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.unsqueeze(1)
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def classifier(cfg: FinetuneConfig, classes: int) -> VisionTransformer:
    """The ViT `cfg` fine-tunes, with a head of `classes`; a linear probe trains the head alone, and
    its BatchNorm before the head keeps running statistics."""
    probe = cfg.finetune.mode == "linear_probe"
    model = build_classifier(
        cfg.model.name, cfg.data.img_size, classes, 0.0 if probe else cfg.finetune.drop_path, probe
    )
    if probe:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("head.")
    return model


def class_count(cfg: FinetuneConfig) -> int:
    """The head's classes: the train split's, which finetune.num_classes, when set, must equal."""
    wanted = cfg.finetune.num_classes
    if cfg.data.backend == "synthetic":
        return wanted or SYNTHETIC_CLASSES
    manifest = resolve_shards(cfg.data.shards, "train").manifest
    if manifest is None:
        if not wanted:
            raise ConfigError(
                f"{cfg.data.shards} has no manifest to count its classes: set finetune.num_classes"
            )
        return wanted
    if not manifest.classes:
        raise ConfigError(
            f"the train shards in {cfg.data.shards} are unlabeled: fine-tuning needs labels"
        )
    if wanted and wanted != len(manifest.classes):
        raise ConfigError(
            f"finetune.num_classes is {wanted}, but the train shards in {cfg.data.shards} label "
            f"{len(manifest.classes)} classes"
        )
    return len(manifest.classes)


def pretrained_weights(init: str, model_name: str) -> dict[str, torch.Tensor]:
    """The state dict model.init names: a maeflow run folder (its newest checkpoint) or a weight
    file."""
    if not Path(init).is_dir():
        return read_weights(init)
    if not (Path(init) / "config.json").is_file():
        raise ConfigError(f"model.init {init} is a folder but not a maeflow run (no config.json)")
    trained = config_from_json(Path(init) / "config.json").model.name
    if trained != model_name:
        raise ConfigError(
            f"model.init {init} is a pre-training run of {trained}; this config fine-tunes "
            f"{model_name} (set model.name={trained}, or start from a run of {model_name})"
        )
    return consolidated_state_dict(Path(init))[0]
