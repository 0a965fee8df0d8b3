"""Is the encoder learning useful features? Weighted k-NN top-1 on frozen features, as
self-supervised work reports it (k = 20, cosine similarity, votes weighted exp(sim / 0.07); Wu et
al. 2018, DINO).

Features are the final-norm encoder outputs on unmasked images: the class token, and the mean of the
patch tokens; both are reported. Every rank embeds its share of each split (the loader in evaluation
mode reads every sample exactly once across ranks); the train features are gathered once to every
rank, each rank classifies its own val samples, and the correct counts are summed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import Loader, build_loader
from pipeline.manifest import check_same_classes

FEATURES = ("cls", "patch_mean")


@dataclass
class Embedded:
    """L2-normalised features of one split on this rank, by kind, and their labels."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor


@torch.no_grad()
def embed(
    encode: Callable[[torch.Tensor], torch.Tensor], loader: Loader, device: torch.device
) -> Embedded:
    """Features of every sample `loader` gives this rank; `encode` maps images to [N, 1+L, D]
    tokens."""
    kinds: dict[str, list[torch.Tensor]] = {kind: [] for kind in FEATURES}
    labels = []
    loader.set_epoch(0)
    for images, batch_labels in loader:
        tokens = encode(images.to(device)).float()
        kinds["cls"].append(F.normalize(tokens[:, 0], dim=1))
        kinds["patch_mean"].append(F.normalize(tokens[:, 1:].mean(1), dim=1))
        labels.append(batch_labels.to(device))
    return Embedded({k: torch.cat(v) for k, v in kinds.items()}, torch.cat(labels))


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (ranks may hold different counts)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    counts = [
        torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(dist.get_world_size())
    ]
    dist.all_gather(counts, torch.tensor([len(local)], device=local.device))
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros((largest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)])


def knn_correct(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> int:
    """How many of `test` the weighted k-NN vote over `train` classifies right (features
    L2-normalised)."""
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        similarity = test[start: start + chunk] @ train.T
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top), classes, device=test.device)
        votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start: start + chunk]).sum())
    return correct


def knn_top1(
    train: Embedded, val: Embedded, k: int = 20, temperature: float = 0.07
) -> dict[str, float]:
    """{"knn_top1_cls", "knn_top1_patch_mean"} in [0, 1] over all ranks' val samples, and the sample
    counts ("knn_train_samples", "knn_val_samples")."""
    train_labels = gather_rows(train.labels)
    highest = torch.stack([train_labels.max(), val.labels.max()]).max().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    classes = int(highest) + 1
    result: dict[str, float] = {}
    for kind in FEATURES:
        correct = knn_correct(
            gather_rows(train.features[kind]),
            train_labels,
            val.features[kind],
            val.labels,
            classes,
            k,
            temperature,
        )
        totals = torch.tensor(
            [correct, len(val.labels)], dtype=torch.float64, device=val.labels.device
        )
        if dist.is_initialized():
            dist.all_reduce(totals)
        result[f"knn_top1_{kind}"] = float(totals[0] / totals[1])
    result["knn_train_samples"], result["knn_val_samples"] = len(train_labels), int(totals[1])
    return result


class KnnMonitor:
    """The k-NN evaluation a run repeats, over two evaluation-mode loaders built once: the train
    memory and the held-out queries (labelled with the same classes: `check_same_classes`)."""

    def __init__(self, memory: Loader, queries: Loader) -> None:
        self.memory, self.queries = memory, queries

    def embed(
        self, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device
    ) -> tuple[Embedded, Embedded]:
        """(the train memory's features, the held-out split's features) on this rank."""
        return embed(encode, self.memory, device), embed(encode, self.queries, device)

    def __call__(self, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device, k: int,
                 temperature: float) -> dict[str, float]:
        return knn_top1(*self.embed(encode, device), k, temperature)


def knn_monitor(
    shards: str, split: str, train_samples: int, val_samples: int, **loader_options: Any
) -> KnnMonitor:
    """A monitor over the train split (its first `train_samples`, 0 = all) and `split`
    (`val_samples`)."""
    # else label k is one class in memory, another in the queries
    check_same_classes(shards, "train", split)
    return KnnMonitor(
        build_loader(
            shards, split="train", train=False, limit=train_samples or None, **loader_options
        ),
        build_loader(shards, split=split, train=False, limit=val_samples or None, **loader_options),
    )
