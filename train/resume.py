"""What `--resume` will do, decided once, before anything is built, loaded or written.

Every check a resume can fail runs here, on every rank, reading only: the checkpoint asked for
exists, the saved config may change into the new one, and the loader's saved position belongs to the
data the run now reads. Only then does rank 0 change the folder (`ResumePlan.apply`): a newer branch
set aside, the old config kept beside the new one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.loader import sample_counts
from pipeline.loader_base import data_identity
from pipeline.loader_state import DataSet, LoaderState
from pipeline.manifest import resolve_shards
from train.checkpoint import (
    ResumeError,
    TrainState,
    complete_tags,
    needs_universal,
    point_latest_at,
    read_train_state,
)
from train.config import ConfigError, RunConfig, builtin_task, config_from_json, flat_fields
from train.recipe import peak_lr
from train.run_folder import keep_config, set_aside_branch
from train.task import Task

# What a resumed run of any task may not change: the model's shape, its optimizer's kind (whose
# state the checkpoint holds), and the data order its checkpoint is a position in. A task adds its
# own (`Task.fixed_on_resume`).
FIXED_ON_RESUME = ("model.name", "data.img_size", "runtime.seed", "optim.optimizer")


def config_changes(
    saved: RunConfig, new: RunConfig, fixed_keys: tuple[str, ...] = FIXED_ON_RESUME
) -> list[str]:
    """`key: old -> new` for every field `new` changes; a ConfigError if it changes one of
    `fixed_keys`."""
    before, after = flat_fields(saved), flat_fields(new)
    changed = [key for key in after if before.get(key) != after[key]]
    fixed = [key for key in changed if key in fixed_keys]
    if fixed:
        raise ConfigError(
            f"--resume cannot change {fixed[0]} ({before[fixed[0]]!r} -> {after[fixed[0]]!r}): the "
            "checkpoint holds a model of that shape at a position in that data order; to change "
            "masks instead, set runtime.mask_seed"
        )
    return [f"{key}: {before.get(key)!r} -> {after[key]!r}" for key in changed]


@dataclass(frozen=True)
class ResumePlan:
    """A checked resume. `tag` None: the folder holds no complete checkpoint, so the run starts
    fresh (what an earlier attempt logged is set aside)."""

    output: Path
    tag: str | None
    saved: TrainState | None
    """step, epoch, samples and rank count of the checkpoint"""
    changes: tuple[str, ...]
    """`key: old -> new` for each config field the resume changes"""
    masks_change: bool
    """runtime.mask_seed changed: masks are drawn afresh from the resumed step"""
    universal: bool
    """DeepSpeed loads through its universal checkpoint (partitioned optimizer state, another rank
    count)"""
    newer: tuple[str, ...]
    """complete checkpoints after `tag`, set aside when the run goes back to it"""
    saved_global_batch_size: int = 0
    """the global batch the checkpoint was trained with (0: no checkpoint)"""
    saved_peak_lr: float = 0.0
    """its peak lr"""

    @property
    def step(self) -> int:
        return self.saved.step if self.saved else 0

    def apply(self) -> list[str]:
        """Rank 0, after every rank planned: set the newer branch aside, keep a changed config's old
        version and point `latest` at the checkpoint (the caller then writes the new config).
        Returns what it did, as lines to print."""
        done = []
        ckpt_dir = self.output / "checkpoints"
        branch = set_aside_branch(self.output, self.step, list(self.newer))
        if branch is not None:
            done.append(f"set aside what the run did after step {self.step} in {branch}"
                        + (f" (checkpoints {', '.join(self.newer)})" if self.newer else ""))
        if self.tag is not None:
            # a crash before the first new checkpoint resumes from here again
            point_latest_at(ckpt_dir, self.tag)
        if self.changes and (self.output / "config.json").is_file():
            kept = keep_config(self.output, self.step)
            done.append(f"resuming with a changed config (the old one is kept as {kept.name}):\n  "
                        + "\n  ".join(self.changes))
        return done


def saved_config(path: Path, task: type[Task]) -> RunConfig:
    """The config a run folder's config.json holds; a ResumeError if another task's script wrote
    it."""
    try:
        written_by = json.loads(path.read_text()).get("task")
    except (OSError, ValueError, AttributeError) as err:
        raise ResumeError(
            f"{path} cannot be read ({err}): the run's config is needed to resume it"
        ) from None
    if written_by != task.config_type.TASK:
        other = builtin_task(written_by)
        what, where = (
            (other.name, other.script)
            if other
            else (f"{written_by!r}", f"task {written_by!r}'s script")
        )
        raise ResumeError(
            f"{path.parent} holds a {what} run: resume it with {where}, not {task.script}"
        )
    return config_from_json(path, task.config_type)


def plan_resume(
    output: Path, tag: str | None, cfg: RunConfig, world_size: int, task: type[Task]
) -> ResumePlan:
    """Check a resume of `task`'s run in `output` from checkpoint `tag`
    (`checkpoint.sound_resume_tag`'s choice;
    None: none to continue from) with config `cfg` on `world_size` ranks, reading only."""
    ckpt_dir = output / "checkpoints"
    config_path = output / "config.json"
    # nothing to continue: an earlier attempt's config is only kept, whatever it says
    if tag is None:
        changes = (
            config_changes(saved_config(config_path, task), cfg, ())
            if config_path.is_file()
            else []
        )
        return ResumePlan(output, None, None, tuple(changes), False, False, ())
    if not config_path.is_file():
        raise ResumeError(f"{config_path} is missing: the run's config is needed to resume it")
    saved_cfg = saved_config(config_path, task)
    changes = tuple(config_changes(saved_cfg, cfg, FIXED_ON_RESUME + task.fixed_on_resume))
    rank_file = ckpt_dir / tag / "rank00000.pt"
    shard_sizes = sample_counts(
        cfg.data.shards, "train", cfg.data.backend, cfg.data.synthetic_samples
    )
    shards = None if cfg.data.backend == "synthetic" else resolve_shards(cfg.data.shards, "train")
    data = DataSet.of(shard_sizes, cfg.runtime.seed, data_identity(shards, sum(shard_sizes)))
    try:
        LoaderState.from_dict(
            torch.load(rank_file, weights_only=True)["loader"], str(rank_file)
        ).check_data(data)
    except ValueError as err:  # FormatError among them
        raise ResumeError(
            f"--resume from {ckpt_dir / tag} with --data {cfg.data.shards}: {err}"
        ) from None
    return ResumePlan(
        output=output, tag=tag, saved=read_train_state(ckpt_dir, tag), changes=changes,
        masks_change=any(change.startswith("runtime.mask_seed:") for change in changes),
        universal=needs_universal(ckpt_dir, tag, world_size),
        newer=tuple(t for t in complete_tags(ckpt_dir) if t > tag),
        saved_global_batch_size=saved_cfg.optim.global_batch_size,
        saved_peak_lr=peak_lr(saved_cfg.optim, saved_cfg.optim.global_batch_size),
    )
