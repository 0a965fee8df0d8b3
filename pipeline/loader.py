"""`build_loader`: shards -> normalized image batches, through DALI or the PIL baseline."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal, get_args

import torch

from pipeline.augment import PRETRAIN, Augmentation
from pipeline.errors import DataError
from pipeline.loader_base import Backend, Device, Loader, LoaderSpec
from pipeline.manifest import resolve_shards
from pipeline.pil_loader import PilLoader
from pipeline.synthetic_loader import IMAGENET_TRAIN_SAMPLES, SyntheticLoader


def _resolve_device(device: Device | Literal["auto"]) -> Device:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in get_args(Device):
        raise ValueError(f"device must be auto, gpu or cpu, got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device='gpu' but torch sees no CUDA device")
    return device


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


# How launchers tell a process how many ranks share its node: torchrun, the deepspeed launcher,
# SLURM's srun (with --ntasks-per-node), Open MPI's and MPICH's mpirun.
LOCAL_RANK_COUNT_VARIABLES = (
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "SLURM_NTASKS_PER_NODE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
)


def local_rank_count() -> int:
    """Ranks on this node, as the launcher says (1 when started without one)."""
    for name in LOCAL_RANK_COUNT_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def default_threads() -> int:
    """CPU threads for one rank's decoding: the CPUs it may use, shared evenly by the ranks that
    share them. Under SLURM, a task's own CPUs (--cpus-per-task) shared by the ranks that task
    started: one each when srun starts the ranks itself (srun may bind each task to its share
    already), all of them when one task per node starts a launcher. Elsewhere, the cores this
    process may use (affinity, cgroups) shared by the node's ranks."""
    usable = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        ranks_per_task = max(1, local_rank_count() // slurm_tasks_on_node())
        return max(1, min(usable, int(per_task)) // ranks_per_task)
    return max(1, usable // local_rank_count())


def slurm_tasks_on_node() -> int:
    """SLURM tasks on this node: --ntasks-per-node, or the first count of SLURM_TASKS_PER_NODE
    ("4(x2),3")."""
    value = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
    first = value.split(",")[0].split("(")[0]
    return int(first) if first.isdigit() and int(first) > 0 else 1


def sample_counts(shards: str | Path | None, split: str, backend: Backend,
                  synthetic_samples: int = IMAGENET_TRAIN_SAMPLES) -> list[int]:
    """Samples per shard of the split a loader of this backend reads (synthetic data: one virtual
    shard)."""
    if backend == "synthetic":
        return [synthetic_samples]
    return resolve_shards(shards, split).sample_counts()


def build_loader(
    shards: str | Path | None,
    *,
    split: str = "train",
    local_batch_size: int = 64,
    img_size: int = 224,
    train: bool = True,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: Device | Literal["auto"] = "auto",
    backend: Backend = "dali",
    num_threads: int | None = None,
    dtype: torch.dtype = torch.float32,
    limit: int | None = None,
    synthetic_samples: int = IMAGENET_TRAIN_SAMPLES,
    augment: Augmentation = PRETRAIN,
    labels: bool = True,
    window_shards: int = 2,
    verbose: bool = False,
) -> Loader:
    """A loader over `shards` (a shard folder with `<split>.json`, or a brace pattern of tars).

    Rank `rank` of `world_size` gets `local_batch_size` images per batch. train: `augment`, by
    default RandomResizedCrop(img_size, scale (0.2, 1), ratio (3/4, 4/3), bicubic) + flip p=0.5;
    else resize the shorter side to img_size/0.875 (bicubic) and centre-crop. Images come normalized
    with the ImageNet mean/std, on the GPU when device="gpu". backend "dali" falls back to "pil"
    (with a message) where DALI is not installed. `num_threads` (DALI threads or PIL worker
    processes) defaults to the CPU cores this process may use over the ranks on this node. `limit`
    reads only the first `limit` samples of the split (the builder shuffled it, so they are a random
    subset). backend "synthetic" reads no shards: random normalized images of a virtual split of
    `synthetic_samples`. `labels` False: batches carry None for labels, and none is read or moved
    (MAE pre-training needs none). The DALI backend reads an epoch in windows of about
    `window_shards` shards, one pipeline each; shards in a bucket (`s3://...`) are fetched whole
    for their window, into the local temporary folder (TMPDIR).
    """
    if window_shards < 1:
        raise ValueError(f"window_shards must be at least 1, got {window_shards}")
    if local_batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need local_batch_size >= 1 and 0 <= rank < world_size, got {local_batch_size}, "
            f"{rank}, {world_size}"
        )
    if backend not in get_args(Backend):
        raise ValueError(f"backend must be one of {', '.join(get_args(Backend))}, got {backend!r}")
    if backend == "dali" and not dali_available():
        print("maeflow: DALI is not installed here; using the PIL backend")
        backend = "pil"
    threads = num_threads or default_threads()
    shard_set = None if backend == "synthetic" else resolve_shards(shards, split)
    samples = synthetic_samples if shard_set is None else sum(shard_set.sample_counts())
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        samples = min(samples, limit)
    if samples == 0:
        raise DataError(f"{shards}: the {split} shards hold no samples")
    if train and samples // world_size < local_batch_size:
        raise DataError(
            f"local batch size {local_batch_size} is larger than a rank's share of "
            f"{samples // world_size} samples ({samples} samples over {world_size} ranks)"
        )
    spec = LoaderSpec(shard_set, split, local_batch_size, img_size, train, rank, world_size, seed,
                      _resolve_device(device), threads, dtype, limit, augment, labels,
                      window_shards)
    if backend == "dali":
        from pipeline.dali_loader import DaliLoader  # imports DALI, which only this backend needs

        loader: Loader = DaliLoader(spec)
    elif backend == "synthetic":
        loader = SyntheticLoader(spec, synthetic_samples)
    else:
        loader = PilLoader(spec)
    if verbose:
        reserved = ""
        if backend == "dali" and spec.device == "gpu":
            from pipeline.dali_graph import reservation

            reserved = f"; its GPU decoding reserves {reservation(threads)} per rank"
        print(
            f"maeflow: {backend} loader on {spec.device}, {len(loader)} batches of "
            f"{local_batch_size} per epoch for rank {rank}/{world_size}, {threads} CPU "
            f"threads{reserved}"
        )
    return loader
