"""Fine-tuning throughput (He et al. 2021, A.2's augmentation), in images/s:

- the data path: maeflow's (DALI: crop, flip and RandAugment in the graph; random erasing and
mixup/cutmix on the
  training device) against the baseline a user runs today (PIL decoding and timm's RandAugment in
  DataLoader workers, timm's RandomErasing and Mixup on the batch), at equal CPU threads, on
  ImageNet-like JPEGs at 224;
- the fine-tuning step: maeflow's trainer (`train/finetune.py`, synthetic images) against the bare
classifier step
  (forward, backward and AdamW over the recipe's layer-decay groups on images in memory), with its
  MFU on GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from bench.context import BenchContext, StageUnavailable, require
from bench.harness import Record, Stat, rate, time_repeats
from bench.pipeline import (
    batch_times,
    data_path_images,
    delivered_and_boundary,
    raw_graph_rate,
    within_epoch_rate,
)
from bench.train import one_rank_run, summarize, trainer_run
from model.flops import classifier_train_flops, peak_flops
from model.vit import build_classifier
from pipeline import build_loader
from pipeline.augment import FINETUNE
from pipeline.batch_augment import draw_mix, mix_batch, random_erase
from pipeline.timm_ops import timm_data_module
from train.config import load_config
from train.engine import attention_backend
from train.recipe import build_optimizer, layer_decay_groups

CLASSES = 1000
# (images, labels) -> (augmented images, soft targets)
BatchAugmentation = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def augmented_rates(shards: Path, backend: str, device: str, threads: int, batch: int, epochs: int,
                    limit: int | None) -> tuple[Stat, Stat]:
    """Images/s the loader delivers with the whole fine-tuning augmentation applied to each batch,
    over the epochs after the first (warm-up): from each epoch's first batch to the next one's
    (epoch boundaries included), and within epochs (first to last batch: the steady state of an
    ImageNet-length epoch)."""
    loader = build_loader(
        shards,
        local_batch_size=batch,
        img_size=224,
        backend=backend,
        device=device,
        num_threads=threads,
        augment=FINETUNE,
        limit=limit,
    )
    on = "cuda" if device == "gpu" else "cpu"
    finish = maeflow_batch_augmentation(on) if backend == "dali" else timm_batch_augmentation(on)
    timeline = batch_times(loader, range(epochs), on == "cuda", finish)
    return delivered_and_boundary(timeline, batch)[0], within_epoch_rate(timeline, batch)


def maeflow_batch_augmentation(device: str) -> BatchAugmentation:
    ft = load_config("finetune_vit_b16").finetune
    from train.classifier_task import mix_config  # imports DeepSpeed, which run() requires first

    mix = mix_config(ft)
    generator, rng = torch.Generator(device=device).manual_seed(0), np.random.default_rng(0)

    def finish(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = random_erase(images, ft.erase_prob, rng, generator)
        return mix_batch(
            images, labels, draw_mix(rng, *images.shape[2:], mix), CLASSES, ft.label_smoothing
        )

    return finish


def timm_batch_augmentation(device: str) -> BatchAugmentation:
    ft = load_config("finetune_vit_b16").finetune
    erasing = timm_data_module("random_erasing").RandomErasing(
        ft.erase_prob, mode="pixel", device=device
    )
    mixup = timm_data_module("mixup").Mixup(
        mixup_alpha=ft.mixup_alpha,
        cutmix_alpha=ft.cutmix_alpha,
        switch_prob=ft.mix_switch_prob,
        label_smoothing=ft.label_smoothing,
        num_classes=CLASSES,
    )
    return lambda images, labels: mixup(erasing(images), labels)


def bare_step_rate(config: str, batch: int, device: str, repeats: int) -> tuple[Stat, int]:
    """img/s of forward + backward + AdamW step of the fine-tuning model over its layer-decay
    groups, and its FLOPs per image."""
    cfg = load_config(config)
    model = build_classifier(cfg.model.name, cfg.data.img_size, CLASSES, cfg.finetune.drop_path).to(
        device
    )
    groups = layer_decay_groups(
        model, model.depth, cfg.optim.weight_decay, cfg.finetune.layer_decay
    )
    optimizer = build_optimizer(model, cfg.optim, 1e-4, groups)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.runtime.precision != "fp32")
    images = torch.randn(batch, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    targets = torch.softmax(torch.randn(batch, CLASSES, device=device), dim=1)

    def step() -> None:
        with autocast, attention_backend(cfg.runtime.attention):
            logits = model(images)
        # soft targets, as fine-tuning's
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_repeats(step, repeats, warmup=3, device="cuda" if device == "cuda" else "cpu")
    return rate(batch, seconds), classifier_train_flops(model)


def run(ctx: BenchContext) -> Iterator[Record]:
    require("deepspeed", "braceexpand")
    gpu = ctx.device == "gpu"
    setups = (
        [("configs/finetune_vit_b16.toml", 128), ("configs/finetune_vit_h14.toml", 32)]
        if gpu
        else [("configs/finetune_tiny.toml", 16)]
    )
    steps, log_every = (
        ((30, 5) if ctx.quick else (100, 10)) if gpu else ((15, 5) if ctx.quick else (60, 10))
    )
    peak = peak_flops(torch.cuda.get_device_name()) if gpu else None
    for config, batch in setups:
        bare, flops = bare_step_rate(config, batch, ctx.torch_device, 10 if gpu else 5)
        windows, _ = trainer_run(config, None, steps, log_every, batch, script="train/finetune.py")
        trainer, _, trainer_mfu = summarize(windows)
        yield Record(
            "finetune",
            f"synthetic_images_per_s.{Path(config).stem}",
            "img/s",
            trainer,
            bare,
            "bare classifier step (same model, precision, layer-decay AdamW; images in memory)",
            one_rank_run(config, batch, steps, log_every),
            extra={
                "mfu": trainer_mfu,
                "bare_step_mfu": flops * bare.median / peak if peak else None,
                "train_flops_per_image": flops,
            },
        )
    try:
        require("nvidia.dali")
    except StageUnavailable as why:
        print(f"finetune: the data path skipped ({why})")
        return
    from pipeline.dali_graph import HW_DECODER_LOAD  # imports DALI
    threads = os.cpu_count() or 1
    batch = 256 if gpu else 32
    count = data_path_images(ctx)  # the pipeline stage's images: generated and sharded once
    # a quick CPU run (CI's dry run of the GPU suite): 8 batches
    limit = 256 if ctx.quick and not gpu else None
    epochs = 2 if ctx.quick else 4  # the first is warm-up
    shards = ctx.shards_of(ctx.imagenet_like_tree(count), workers=threads)
    ours, ours_within = augmented_rates(shards, "dali", ctx.device, threads, batch, epochs, limit)
    try:
        require("timm")
        baseline, baseline_within = augmented_rates(
            shards, "pil", ctx.device, threads, batch, epochs, limit
        )
    except StageUnavailable as why:
        print(f"finetune: the PIL + timm baseline skipped ({why}; pip install --no-deps timm)")
        baseline = baseline_within = None
    config = {
        "img_size": 224,
        "local_batch_size": batch,
        "images": limit or count,
        "epochs": epochs,
        "threads": threads,
        "augmentation": "random resized crop (0.08, 1) + flip + RandAugment (9, 0.5) + random "
                        "erasing 0.25 + mixup 0.8 / cutmix 1.0 + label smoothing 0.1",
    }
    config["decode"] = "mixed (nvJPEG)" if gpu else "cpu"
    # The DALI graph alone (crop, flip, RandAugment; one pipeline, no epoch ends, no batch
    # augmentation): how much of the delivered rate the graph allows, and the figure for
    # "fine-tuning data per GPU with RandAugment".
    graph = build_loader(
        shards,
        local_batch_size=batch,
        img_size=224,
        backend="dali",
        device=ctx.device,
        num_threads=threads,
        augment=FINETUNE,
        limit=limit,
    )
    ceiling = raw_graph_rate(graph, HW_DECODER_LOAD, len(graph), repeats=epochs - 1)
    baseline_name = (f"PIL + timm RandAugment in {threads} DataLoader workers, timm RandomErasing "
                     "and Mixup on the batch")
    yield Record("finetune", "data_path_raw_graph_vs_delivered", "img/s", ceiling, ours,
                 "build_loader with the batch augmentation, epoch boundaries included", config)
    yield Record(
        "finetune", "data_path_dali_vs_pil_timm", "img/s", ours, baseline, baseline_name, config
    )
    yield Record(
        "finetune",
        "data_path_within_epoch_dali_vs_pil_timm",
        "img/s",
        ours_within,
        baseline_within,
        baseline_name,
        config,
    )
