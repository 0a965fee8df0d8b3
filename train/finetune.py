"""Fine-tuning and the linear probe of a pre-trained MAE encoder (He et al. 2021, appendix A.2 and A.3).

    deepspeed --num_gpus 8 train/finetune.py --config finetune_vit_b16 --data /data/shards --output runs/ft_b \
        --set model.init=runs/vit_b [--max-steps N] [--resume] [--set finetune.mode=linear_probe ...]

Launched, configured, checkpointed and resumed like train/pretrain.py, whose trainer this one extends (same
flags, exit codes, metrics.jsonl, TensorBoard, resume on any rank count). `model.init` is a maeflow pre-training
run folder, a `train.export` file or a reference-layout .pth. One step: a DALI batch (random resized crop, flip,
RandAugment) -> random erasing and mixup/cutmix on the device -> the ViT -> cross-entropy on soft targets.
At every `eval.every_epochs` epochs and at the end: top-1 and top-5 on the val split, every image once; the best
weights so far are kept apart as OUTPUT/best.pth (reference layout, like a `train.export` file).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script by a launcher: import from the repo, not from train/ itself
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.flops import classifier_train_flops
from model.vit import VisionTransformer, build_classifier, load_encoder
from model.weights import read_weights
from pipeline import Loader, build_loader
from pipeline.atomic import atomic_path
from pipeline.augment import Augmentation
from pipeline.batch_augment import MixConfig, draw_mix, mix_batch, random_erase, smooth_targets
from pipeline.manifest import check_same_classes, resolve_shards
from pipeline.synthetic_loader import SYNTHETIC_CLASSES
from train.config import ConfigError, FinetuneConfig, TrainConfig, config_from_json
from train.export import consolidated_state_dict
from train.pretrain import Trainer, main
from train.recipe import build_optimizer, layer_decay_groups

BEST_WEIGHTS = "best.pth"


class FinetuneTrainer(Trainer):
    """Pre-training's trainer with a classifier, its recipe's optimizer groups, batch augmentation and loss, and
    a top-1/top-5 evaluation in place of the k-NN monitor and the reconstructions."""

    makes_reconstructions = False

    def __init__(self, cfg: TrainConfig, resume: str | None) -> None:
        self.val_loader = None
        self.best_top1 = -1.0
        super().__init__(cfg, resume)
        self.mix = mix_config(cfg.finetune)
        if cfg.eval.every_epochs and not self.synthetic:
            self.val_loader = self.on_every_rank(self._build_val_loader)
        if resume:  # the best so far on this branch of the run (a rollback set later records aside with its steps)
            self.best_top1 = max(logged_top1(self.output / "metrics.jsonl"), default=-1.0)

    @property
    def probe(self) -> bool:
        return self.cfg.finetune.mode == "linear_probe"

    @property
    def augmentation(self) -> Augmentation:
        return image_augmentation(self.cfg.finetune)

    @property
    def evaluates(self) -> bool:
        return self.val_loader is not None

    def build_model(self, initialise: bool) -> VisionTransformer:
        cfg = self.cfg
        self.num_classes = self.on_every_rank(lambda: class_count(cfg))
        drop_path = 0.0 if self.probe else cfg.finetune.drop_path
        model = build_classifier(cfg.model.name, cfg.data.img_size, self.num_classes, drop_path, self.probe)
        if cfg.model.init and initialise:
            state = self.on_every_rank(lambda: pretrained_weights(cfg.model.init, cfg.model.name))
            fresh = self.on_every_rank(lambda: load_encoder(model, state, cfg.model.init))
            self.say(f"initialised from {cfg.model.init}; trained from scratch: {', '.join(fresh) or 'nothing'}")
        if self.probe:  # only the head learns; the BatchNorm before it keeps running statistics
            for name, param in model.named_parameters():
                param.requires_grad = name.startswith("head.")
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        layer_decay = 1.0 if self.probe else self.cfg.finetune.layer_decay
        groups = layer_decay_groups(self.model, self.model.depth, self.cfg.optim.weight_decay, layer_decay)
        return build_optimizer(self.model, self.cfg.optim, self.peak_lr, groups)

    def train_flops_per_image(self) -> int:
        return classifier_train_flops(self.model, trains_encoder=not self.probe)

    def _knn_monitor(self) -> None:
        return None  # fine-tuning measures the classifier itself

    def _build_val_loader(self) -> Loader | None:
        """The held-out split's loader (every image once over the ranks), or None without one."""
        cfg = self.cfg
        try:
            resolve_shards(cfg.data.shards, cfg.eval.split)
        except FileNotFoundError as err:
            self.say(f"evaluation off: {str(err).splitlines()[0]}")
            return None
        check_same_classes(cfg.data.shards, "train", cfg.eval.split)
        return build_loader(cfg.data.shards, split=cfg.eval.split, local_batch_size=self.plan.local_batch_size,
                            img_size=cfg.data.img_size, train=False, rank=self.rank, world_size=self.world,
                            device=self.loader_device, backend=cfg.data.backend,
                            num_threads=cfg.data.num_threads or None, dtype=self.dtype)

    # ---------------------------------------------------------------- the step

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """Cross-entropy against soft targets: erased, mixed images with smoothed labels (the probe: neither)."""
        ft = self.cfg.finetune
        # Every draw depends on (seed, rank, step, micro-batch) only, so a resumed run augments as an unbroken one
        # would: erasing and mixing from their own generators, drop path from torch's, seeded here.
        seed = hash((self.cfg.runtime.seed, self.rank, self.state.step, batch % self.plan.grad_accum_steps)) % 2**63
        torch.manual_seed(seed)
        if self.probe:
            targets = smooth_targets(labels, self.num_classes, 0.0)
        else:
            rng = np.random.default_rng(seed)
            if ft.erase_prob:  # the noise from the trainer's device generator (masks, in pre-training), reseeded
                images = random_erase(images, ft.erase_prob, rng, self.noise_gen.manual_seed(seed))
            if self.mix.mixing:
                draw = draw_mix(rng, *images.shape[2:], self.mix)
                images, targets = mix_batch(images, labels, draw, self.num_classes, ft.label_smoothing)
            else:
                targets = smooth_targets(labels, self.num_classes, ft.label_smoothing)
        return F.cross_entropy(self.engine(images).float(), targets)  # targets are class probabilities

    # ---------------------------------------------------------------- evaluation

    def _evaluate(self) -> None:
        """Top-1, top-5 and the loss over every val image once (all ranks); the best weights kept apart."""
        began, cfg = time.perf_counter(), self.cfg
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # top-1 hits, top-5 hits, images, loss
        self.engine.eval()
        self.val_loader.set_epoch(0)
        with torch.no_grad():
            for images, labels in self.val_loader:
                logits = self.engine(images).float()
                top1, top5 = top_hits(logits, labels)
                totals += torch.stack([top1, top5, labels.new_tensor(len(labels)),
                                       F.cross_entropy(logits, labels, reduction="sum")]).to(totals)
        self.engine.train()
        dist.all_reduce(totals)
        top1, top5, val_loss = (float(totals[0] / totals[2]), float(totals[1] / totals[2]),
                                float(totals[3] / totals[2]))
        self.evaluated_step = self.state.step
        # The epochs completed, also when the run's last step ends one (the loop has not moved on then).
        epochs_done = self.state.step // self.steps_per_epoch
        self.record({"step": self.state.step, "epoch": epochs_done, "top1": top1, "top5": top5,
                     "val_loss": val_loss, "val_samples": int(totals[2]), "eval_s": time.perf_counter() - began})
        best = top1 > self.best_top1
        if best:
            self.best_top1 = top1
            self._save_best({"step": self.state.step, "epoch": epochs_done, "top1": top1, "top5": top5})
        self.say(f"{cfg.eval.split} top-1 {100 * top1:.2f}%, top-5 {100 * top5:.2f}% at step {self.state.step} "
                 f"({int(totals[2])} images){'; the best so far: ' + str(self.output / BEST_WEIGHTS) if best else ''}")

    def _save_best(self, result: dict) -> None:
        """OUTPUT/best.pth, written atomically by rank 0 (ZeRO-3 gathers the weights on every rank first)."""
        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.runtime.zero_stage == 3):
            if self.is_main:
                state = {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
                with atomic_path(self.output / BEST_WEIGHTS) as tmp:
                    torch.save({"model": state, "maeflow": {**result, "config": asdict(self.cfg)}}, tmp)


def logged_top1(metrics: Path) -> list[float]:
    """The top-1 of every evaluation a run's metrics.jsonl records (none when it has no such file)."""
    if not metrics.is_file():
        return []
    return [record["top1"] for record in map(json.loads, metrics.read_text().splitlines()) if "top1" in record]


def mix_config(ft: FinetuneConfig) -> MixConfig:
    """The batch mixing and label smoothing the config asks for."""
    return MixConfig(ft.mixup_alpha, ft.cutmix_alpha, ft.mix_switch_prob, ft.label_smoothing)


def image_augmentation(ft: FinetuneConfig) -> Augmentation:
    """What the training loader does to each image: the crop, the flip and (not in the probe) RandAugment."""
    layers = 0 if ft.mode == "linear_probe" else ft.rand_augment_layers
    return Augmentation(crop_scale=(ft.crop_min_scale, 1.0), rand_augment_layers=layers,
                        rand_augment_magnitude=ft.rand_augment_magnitude)


def top_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of the batch the top class, and any of the top 5 (all, with fewer classes), got right."""
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.unsqueeze(1)
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def class_count(cfg: TrainConfig) -> int:
    """The head's classes: the train split's, which finetune.num_classes, when set, must equal."""
    wanted = cfg.finetune.num_classes
    if cfg.data.backend == "synthetic":
        return wanted or SYNTHETIC_CLASSES
    manifest = resolve_shards(cfg.data.shards, "train").manifest
    if manifest is None:
        if not wanted:
            raise ConfigError(f"{cfg.data.shards} has no manifest to count its classes: set finetune.num_classes")
        return wanted
    if not manifest.classes:
        raise ConfigError(f"the train shards in {cfg.data.shards} are unlabeled: fine-tuning needs labels")
    if wanted and wanted != len(manifest.classes):
        raise ConfigError(f"finetune.num_classes is {wanted}, but the train shards in {cfg.data.shards} label "
                          f"{len(manifest.classes)} classes")
    return len(manifest.classes)


def pretrained_weights(init: str, model_name: str) -> dict[str, torch.Tensor]:
    """The state dict model.init names: a maeflow run folder (its newest checkpoint) or a weight file."""
    if not Path(init).is_dir():
        return read_weights(init)
    if not (Path(init) / "config.json").is_file():
        raise ConfigError(f"model.init {init} is a folder but not a maeflow run (no config.json)")
    trained = config_from_json(Path(init) / "config.json").model.name
    if trained != model_name:
        raise ConfigError(f"model.init {init} is a pre-training run of {trained}; this config fine-tunes "
                          f"{model_name} (set model.name={trained}, or start from a run of {model_name})")
    return consolidated_state_dict(Path(init))[0]


if __name__ == "__main__":
    sys.exit(main(trainer_class=FinetuneTrainer,
                  description="Fine-tuning and the linear probe of a pre-trained MAE encoder with DeepSpeed ZeRO"))
