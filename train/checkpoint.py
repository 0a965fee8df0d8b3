"""Complete-or-absent DeepSpeed checkpoints with per-rank loader and RNG state.

Layout under OUTPUT/checkpoints/:
    step00001200/               DeepSpeed's files (ZeRO shards, client state) + our per-rank files
        rank00000.pt            loader position and mask-noise generator of rank 0, ...
        train_state.json        step, epoch, samples seen, world size (read before DeepSpeed loads)
    latest                      name of the newest complete checkpoint, replaced atomically last

A crash while saving leaves `latest` pointing at the previous checkpoint, so a half-written
directory is never loaded; it is removed at the next successful save.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.atomic import atomic_path, atomic_write_text

LATEST = "latest"


@dataclass
class TrainState:
    step: int = 0
    """optimizer steps taken"""
    epoch: int = 0
    """epoch the loader is in"""
    samples: int = 0
    """images seen, all ranks together"""
    world_size: int = 1
    """ranks that wrote the checkpoint"""


class ResumeError(RuntimeError):
    """The checkpoint cannot be resumed as asked; the message says what to do."""


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def save_checkpoint(engine: Any, ckpt_dir: Path, state: TrainState, rank_state: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = f"step{state.step:08d}"
    rank = dist.get_rank()
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(tag_dir / f"rank{rank:05d}.pt") as tmp:
        torch.save(rank_state, tmp)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"train_state": asdict(state)}, save_latest=False)
    dist.barrier()
    if rank == 0:
        (tag_dir / "train_state.json").write_text(json.dumps(asdict(state)))
        atomic_write_text(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last, tag)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, newest: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [t for t in tags if (ckpt_dir / t / "train_state.json").is_file()]
    doomed = set(complete[:-keep_last]) | {t for t in tags if t not in complete and t < newest}
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load_checkpoint(engine: Any, ckpt_dir: Path, gradient_clipping: float) -> tuple[TrainState, dict] | None:
    """Collective. The newest complete checkpoint's state and this rank's loader/RNG state, or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    state = TrainState(**json.loads((ckpt_dir / tag / "train_state.json").read_text()))
    world = dist.get_world_size()
    if state.world_size != world:
        raise ResumeError(
            f"{ckpt_dir / tag} was written by {state.world_size} ranks but this run has {world}. Resume with "
            f"{state.world_size} ranks (ZeRO shards and per-rank data positions are tied to the rank count), or "
            f"consolidate the weights with `python -m train.export {ckpt_dir.parent} --to weights.pth` and start a "
            f"new run from them with --set model.init=weights.pth (the optimizer state and schedule start afresh)."
        )
    engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
    # ZeRO restores clip_grad from the optimizer state, which would silently override the config.
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = gradient_clipping
    rank_state = torch.load(ckpt_dir / tag / f"rank{dist.get_rank():05d}.pt", weights_only=True)
    return state, rank_state
