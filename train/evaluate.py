"""Evaluate an encoder without fine-tuning: weighted k-NN top-1 and a linear probe on frozen
features.

    python -m train.evaluate runs/vit_b16 --data /data/shards [--tag step00100000]
    python -m train.evaluate mae_pretrain_vit_base.pth --model mae_vit_base_patch16 --data
    /data/shards python -m train.evaluate exported.pth --data /data/shards      (a train.export file
    knows its model)

The linear probe is the paper's protocol in miniature (He et al. 2021, appendix A.3): the class
token's features, BatchNorm without affine parameters, then a linear classifier trained with SGD
(momentum 0.9, lr 1.0 x batch / 256 on a cosine) for a few epochs on features computed once, without
augmentation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from model import MaskedAutoencoderViT, build_mae, load_reference_weights
from model.weights import load_weights_file
from pipeline.formats import check_format
from train.config import RuntimeConfig, config_from_dict, config_from_json
from train.engine import evaluating
from train.export import consolidated_state_dict
from train.knn import Embedded, knn_monitor, knn_top1
from train.mae_task import mae_from_config


def load_encoder(source: Path, tag: str, preset: str | None,
                 img_size: int) -> tuple[MaskedAutoencoderViT, str, RuntimeConfig]:
    """The model to evaluate, where its weights came from, and how its run computed (its precision
    and attention; a reference-layout file of the preset `preset` has no run: the defaults).
    `source`: a run folder, a train.export file (which records its config) or a reference-layout
    file."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such run folder or weight file")
    if source.is_dir():
        cfg = config_from_json(source / "config.json")
        state, provenance = consolidated_state_dict(source, tag)
        model = mae_from_config(cfg)
        model.load_state_dict(state)
        return model, provenance["checkpoint"], cfg.runtime
    saved = load_weights_file(source)
    runtime = RuntimeConfig()
    if isinstance(saved, dict) and "maeflow" in saved:
        check_format("weights", saved["maeflow"], str(source))
        cfg = config_from_dict(saved["maeflow"]["config"])
        model, runtime = mae_from_config(cfg), cfg.runtime
    elif preset:
        model = build_mae(preset, img_size=img_size)
    else:
        raise ValueError(
            f"{source} does not say which model it holds: pass --model (e.g. mae_vit_base_patch16)"
        )
    if not isinstance(saved, dict):
        raise ValueError(f"{source}: expected {{'model': state_dict}} or a state dict")
    return model, f"{source} ({load_reference_weights(model, saved)})", runtime


def linear_probe(
    train: Embedded, val: Embedded, epochs: int, batch: int = 256, base_lr: float = 1.0
) -> float:
    """Top-1 of BatchNorm(affine=False) + Linear trained on the cls features of `train`, tested on
    `val`."""
    torch.manual_seed(0)
    features, labels = train.features["cls"], train.labels
    classes = int(max(labels.max(), val.labels.max())) + 1
    head = nn.Sequential(
        nn.BatchNorm1d(features.shape[1], affine=False), nn.Linear(features.shape[1], classes)
    )
    head = head.to(features.device)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=base_lr * batch / 256, momentum=0.9, weight_decay=0.0
    )
    steps = epochs * math.ceil(len(features) / batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    for _ in range(epochs):
        for chunk in torch.randperm(len(features), device=features.device).split(batch):
            if len(chunk) < 2:
                continue  # BatchNorm needs two samples
            loss = nn.functional.cross_entropy(head(features[chunk]), labels[chunk])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    head.eval()
    with torch.no_grad():
        return float((head(val.features["cls"]).argmax(1) == val.labels).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "source", help="a training output folder, a train.export file or a reference weight file"
    )
    parser.add_argument(
        "--data", required=True,
        help="shard folder (or s3://bucket/prefix) with a train split and the held-out split"
    )
    parser.add_argument(
        "--tag", default="latest", help="run folders: which checkpoint (default: the newest)"
    )
    parser.add_argument("--model", help="reference files: the preset, e.g. mae_vit_base_patch16")
    parser.add_argument("--img-size", type=int, default=224, help="reference files: the resolution")
    parser.add_argument("--split", default="val", help="the held-out split")
    parser.add_argument(
        "--train-samples", type=int, default=0, help="train samples as k-NN memory (0 = all)"
    )
    parser.add_argument("--val-samples", type=int, default=0, help="held-out samples (0 = all)")
    parser.add_argument("--k", type=int, default=20, help="neighbours voting")
    parser.add_argument(
        "--temperature", type=float, default=0.07, help="vote weight exp(similarity / T)"
    )
    parser.add_argument(
        "--probe-epochs", type=int, default=10, help="linear probe epochs (0 = no probe)"
    )
    parser.add_argument("--batch", type=int, default=128, help="images per forward pass")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    bad = [
        f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}"
        for name, ok, rule in (
            ("k", args.k >= 1, "at least 1"),
            ("temperature", args.temperature > 0, "positive"),
            ("batch", args.batch >= 1, "at least 1"),
            ("train_samples", args.train_samples >= 0, ">= 0"),
            ("val_samples", args.val_samples >= 0, ">= 0"),
            ("probe_epochs", args.probe_epochs >= 0, ">= 0"),
            ("img_size", args.img_size >= 1, "positive"),
        )
        if not ok
    ]
    if bad:
        parser.error(bad[0])
    try:
        model, origin, runtime = load_encoder(
            Path(args.source), args.tag, args.model, args.img_size
        )
        monitor = knn_monitor(args.data, args.split, args.train_samples, args.val_samples,
                             local_batch_size=args.batch, img_size=model.img_size[0])
    # ResumeError and ConfigError among them
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    # as the run's own evaluation computes (whole weights)
    with evaluating(model, runtime, device, gather=False):
        memory, queries = monitor.embed(model.forward_features, device)
    result = {"source": origin, **knn_top1(memory, queries, args.k, args.temperature)}
    if args.probe_epochs:
        result["linear_probe_top1"] = linear_probe(memory, queries, args.probe_epochs)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
