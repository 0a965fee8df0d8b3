"""Complete-or-absent DeepSpeed checkpoints with per-rank loader and RNG state, resumable on any
rank count.

Layout under OUTPUT/checkpoints/:
    step00001200/               DeepSpeed's files (ZeRO shards, client state) + our per-rank files
        rank00000.pt            loader position and the task's random streams of rank 0, ...
        train_state.json        the completion mark: step, epoch, samples seen, world size, the
        periodic jobs'
                                state (read before DeepSpeed starts), and every other file of the
                                checkpoint with its size and a digest of its ends. Written last,
                                once every rank's files are on the disk: its presence marks the
                                checkpoint complete
        adamw_norms.json        the L2 norms of AdamW's two moments: what a resume must reproduce
        milestone               present when the checkpoint is a milestone: kept apart from
        keep_last
    latest                      name of the newest complete checkpoint, replaced after the mark
    universal/step00001200/     DeepSpeed's universal form of a checkpoint, made when a run resumes
    it on
                                another rank count (per-parameter fp32 weights and AdamW moments)
    (a run that goes back to an older checkpoint moves the newer ones to OUTPUT/abandoned/:
    train.run_folder)

Every file is flushed to the disk before what relies on it (`pipeline.atomic`): each rank's files
before the mark, the mark before `latest`, `latest` before older checkpoints are pruned. A crash
while saving leaves `latest` pointing at the previous checkpoint, so a half-written directory is
never loaded; it is removed at the next successful save. A resume checks the files the mark lists: a
damaged newest checkpoint is passed over for the newest sound one (`sound_resume_tag`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.atomic import atomic_path, atomic_write_text, fsync_path
from pipeline.formats import check_format, stamp
from train.cadence import CheckpointCadence, EveryEpochs
from train.config import CheckpointConfig

LATEST = "latest"
MILESTONE = "milestone"
ADAMW_NORMS = "adamw_norms.json"
MARK = "train_state.json"  # the completion mark
DIGESTED_ENDS = 2**16  # bytes of each end of a part that its digest covers


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
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """each periodic job's state by its name (the best top-1 so far)"""


class ResumeError(RuntimeError):
    """The checkpoint cannot be resumed as asked; the message says what to do."""


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoints every rank finished writing (their completion mark is there), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        p.name for p in ckpt_dir.iterdir() if p.name.startswith("step") and (p / MARK).is_file()
    )


def read_mark(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """A checkpoint's completion mark: its run state and its parts (FormatError in another
    format)."""
    path = ckpt_dir / tag / MARK
    mark = json.loads(path.read_text())
    check_format("checkpoint", mark, str(path))
    return mark


def read_train_state(ckpt_dir: Path, tag: str) -> TrainState:
    mark = read_mark(ckpt_dir, tag)
    return TrainState(**{f.name: mark[f.name] for f in fields(TrainState)})


def resume_tag(ckpt_dir: Path, wanted: str) -> str | None:
    """The checkpoint `--resume` means: "latest", or a tag such as step00001200 (or just 1200), that
    is complete."""
    if wanted == LATEST:
        return latest_tag(ckpt_dir)
    tag = tag_of(int(wanted)) if wanted.isdigit() else wanted
    if tag not in complete_tags(ckpt_dir):
        raise ResumeError(f"{ckpt_dir} holds no complete checkpoint {tag}; complete ones: "
                          f"{', '.join(complete_tags(ckpt_dir)) or 'none'}")
    return tag


def part_digest(path: Path) -> str:
    """A digest of a file's first and last 64 KiB (of all of it, when smaller): it tells a part cut
    short or zero-filled by a crash from the one written, for two small reads however large the
    part."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(DIGESTED_ENDS))
        if size > 2 * DIGESTED_ENDS:
            f.seek(size - DIGESTED_ENDS)
        digest.update(f.read())
    return digest.hexdigest()[:32]


def describe_part(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "digest": part_digest(path)}


def damage(ckpt_dir: Path, tag: str) -> str | None:
    """What is wrong with checkpoint `tag` (a part missing, of another size or content than its mark
    lists, or a mark that cannot be read), in a few words; None when it is sound."""
    folder = ckpt_dir / tag
    try:
        parts = read_mark(ckpt_dir, tag)["parts"]
    except (OSError, ValueError, KeyError, TypeError) as err:  # FormatError is a ValueError
        return f"its completion mark {MARK} cannot be read ({type(err).__name__}: {err})"
    for name, written in sorted(parts.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != written["bytes"]:
            return f"{name} is {size} bytes, {written['bytes']} when written"
        if part_digest(path) != written["digest"]:
            return f"{name} holds other bytes than were written"
    return None


def sound_resume_tag(ckpt_dir: Path, wanted: str) -> tuple[str | None, list[str]]:
    """The checkpoint `--resume` continues from, and a line for each newer one passed over as
    damaged: with "latest", the checkpoint `latest` names or, where it is damaged, the newest sound
    one before it (pruning only ever follows a sound new checkpoint, so one is left); a tag named
    must be sound itself (ResumeError)."""
    tag = resume_tag(ckpt_dir, wanted)
    if tag is None:
        return None, []
    passed_over = []
    for candidate in (
        [tag] if wanted != LATEST else [t for t in reversed(complete_tags(ckpt_dir)) if t <= tag]
    ):
        problem = damage(ckpt_dir, candidate)
        if problem is None:
            return candidate, passed_over
        passed_over.append(f"checkpoint {ckpt_dir / candidate} is damaged: {problem}")
    raise ResumeError(
        f"{'; '.join(passed_over)}; no sound checkpoint to resume from"
        + (
            ""
            if wanted == LATEST
            else f" among those asked ({tag}): --resume takes the newest sound one"
        )
    )


class CheckpointNotWritten(OSError):
    """No room for the next checkpoint, or a write that failed: the message names the folder and the
    free space."""


def checkpoint_bytes(ckpt_dir: Path, engine: Any) -> int:
    """What the next checkpoint will take: the newest complete one's size, or before the first one
    an estimate."""
    done = complete_tags(ckpt_dir)
    if done:
        return sum(f.stat().st_size for f in (ckpt_dir / done[-1]).rglob("*") if f.is_file())
    return estimated_checkpoint_bytes(engine.module)


def estimated_checkpoint_bytes(model: torch.nn.Module) -> int:
    """A checkpoint's size before one exists: fp32 weights (4 bytes a parameter) and AdamW's two
    moments of each trained one (8 more)."""
    return sum((12 if p.requires_grad else 4) * p.numel() for p in model.parameters())


def check_room(ckpt_dir: Path, tag: str, need: int, group: Any) -> None:
    """Collective: CheckpointNotWritten on every rank unless every rank's file system has room for
    one more checkpoint (with a 5% margin): the new one is written before the old ones are
    pruned."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    free = torch.tensor([shutil.disk_usage(ckpt_dir).free], dtype=torch.int64)
    dist.all_reduce(free, op=dist.ReduceOp.MIN, group=group)
    if int(free) < need * 1.05:
        raise CheckpointNotWritten(
            f"checkpoint {ckpt_dir / tag} needs about {need / 1e9:.2f} GB and its file system has "
            f"{int(free) / 1e9:.2f} GB free; nothing was written, the last checkpoint "
            f"({latest_tag(ckpt_dir) or 'none yet'}) is intact: free space or move the run, then "
            "--resume"
        )


class DurableParts:
    """DeepSpeed's checkpoint engine, with every file it saves for this rank flushed to the disk and
    listed (its size and digest) for the completion mark. Every other call goes to the engine it
    wraps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written: dict[str, dict[str, Any]] = {}

    def save(self, state_dict: Any, path: str) -> None:
        self.inner.save(state_dict, path)
        fsync_path(path)
        self.written[Path(path).name] = describe_part(Path(path))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def save_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    state: TrainState,
    rank_state: dict,
    keep_last: int,
    adamw_norms: tuple[float, float],
    group: Any,
    milestone: bool = False,
) -> str:
    """Collective: every rank calls it, with `engine.checkpoint_engine` a `DurableParts`. Returns
    the tag written. `adamw_norms` (optimizer_state_norms) is kept beside it: a resume on any rank
    count must reproduce it. `group`: the CPU side-channel the room check and the parts' list go
    over. A save that fails part-way (a disk that filled up regardless) removes what it wrote of
    this checkpoint."""
    tag = tag_of(state.step)
    rank = dist.get_rank()
    tag_dir = ckpt_dir / tag
    parts: DurableParts = engine.checkpoint_engine
    check_room(ckpt_dir, tag, checkpoint_bytes(ckpt_dir, engine), group)
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        own = tag_dir / f"rank{rank:05d}.pt"
        with atomic_path(own) as tmp:
            torch.save(rank_state, tmp)
        parts.written = {own.name: describe_part(own)}
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"train_state": asdict(state)},
                               save_latest=False)
    # torch.save reports ENOSPC as "[enforce fail ...] unexpected pos"
    except (RuntimeError, OSError) as err:
        shutil.rmtree(tag_dir, ignore_errors=True)
        free = shutil.disk_usage(ckpt_dir).free
        raise CheckpointNotWritten(
            f"writing checkpoint {tag_dir} failed ({str(err).strip().splitlines()[0]}) with "
            f"{free / 1e9:.2f} GB free on its file system; the partial checkpoint was removed, the "
            f"last one ({latest_tag(ckpt_dir) or 'none yet'}) is intact"
        ) from err
    written: list[dict[str, dict[str, Any]]] = [{} for _ in range(dist.get_world_size())]
    # every rank's parts are on the disk now
    dist.all_gather_object(written, parts.written, group=group)
    if rank == 0:
        listed = {name: part for rank_parts in written for name, part in rank_parts.items()}
        extra = {ADAMW_NORMS: json.dumps(list(adamw_norms))}
        if milestone:
            extra[MILESTONE] = json.dumps({"epoch": state.epoch})
        for name, text in extra.items():
            atomic_write_text(tag_dir / name, text)
            listed[name] = describe_part(tag_dir / name)
        mark = stamp("checkpoint", {**asdict(state), "parts": listed})
        atomic_write_text(tag_dir / MARK, json.dumps(mark))  # marks it complete
        point_latest_at(ckpt_dir, tag)
        prune_checkpoints(ckpt_dir, keep_last, tag)
    dist.barrier(group=group)
    return tag


def prune_checkpoints(ckpt_dir: Path, keep_last: int, newest: str) -> None:
    """Keep the newest `keep_last` complete checkpoints (milestones apart); remove every incomplete
    one older than `newest`: a save that was killed half-way."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = complete_tags(ckpt_dir)
    rolling = [t for t in complete if not (ckpt_dir / t / MILESTONE).is_file()]
    doomed = set(rolling[:-keep_last]) | {t for t in tags if t not in complete and t < newest}
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        shutil.rmtree(ckpt_dir / "universal" / tag, ignore_errors=True)


def point_latest_at(ckpt_dir: Path, tag: str) -> None:
    """Make `tag` the checkpoint a plain --resume continues from."""
    atomic_write_text(ckpt_dir / LATEST, tag)


def needs_universal(ckpt_dir: Path, tag: str, world_size: int) -> bool:
    """Whether resuming `tag` on `world_size` ranks goes through DeepSpeed's universal checkpoint:
    the rank count changed and the optimizer state is partitioned (ZeRO 1-3, or the bf16 optimizer's
    shards)."""
    partitioned = any((ckpt_dir / tag).glob("*zero_pp_rank_*optim_states.pt"))
    return partitioned and read_train_state(ckpt_dir, tag).world_size != world_size


def make_universal(ckpt_dir: Path, tag: str) -> Path:
    """Collective: rank 0 converts `tag` to DeepSpeed's universal form once (kept beside it);
    returns its parent folder, which `engine.load_checkpoint` takes with `load_universal`. The
    conversion runs in a fresh
    process: its worker pool must not fork a process that holds loader and communication threads."""
    target = ckpt_dir / "universal" / tag
    failure = [None]
    if dist.get_rank() == 0 and not (target / "zero").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        workers = max(1, min(4, len(os.sched_getaffinity(0))))
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpt_dir / tag),
            "--output_folder",
            str(target),
            "--num_extract_workers",
            str(workers),
            "--num_merge_workers",
            "1",
            "--inject_missing_state",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            failure = [f"converting {ckpt_dir / tag} to DeepSpeed's universal checkpoint failed:\n"
                       f"{done.stdout[-2000:]}{done.stderr[-2000:]}"]
    # every rank stops, not only the one that saw it fail
    dist.broadcast_object_list(failure, src=0)
    if failure[0]:
        raise ResumeError(failure[0])
    return target.parent


def load_checkpoint(
    engine: Any, ckpt_dir: Path, tag: str, universal: bool, gradient_clipping: float
) -> dict:
    """Collective: model and optimizer state of `tag` into `engine`. Returns this rank's saved state
    where the rank count is unchanged, else rank 0's loader state alone (the position every rank was
    at)."""
    world = dist.get_world_size()
    same_ranks = read_train_state(ckpt_dir, tag).world_size == world
    folder = make_universal(ckpt_dir, tag) if universal else ckpt_dir
    engine.load_checkpoint(str(folder), tag=tag, load_lr_scheduler_states=False)
    # ZeRO restores clip_grad from the optimizer state, which would silently override the config.
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = gradient_clipping
    if same_ranks:
        return torch.load(ckpt_dir / tag / f"rank{dist.get_rank():05d}.pt", weights_only=True)
    # Every rank was at the same data position; the new ranks' random streams start afresh.
    first = torch.load(ckpt_dir / tag / "rank00000.pt", weights_only=True)
    return {"loader": first["loader"]}


def check_shared_folder(folder: Path, group: Any = None) -> None:
    """Collective: stop, on every rank, unless every rank sees the files the others write in
    `folder` (checkpoints written to node-local disks could not be resumed)."""
    probe = folder / ".shared-check"
    probe.mkdir(parents=True, exist_ok=True)
    run = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(run, src=0, group=group)
    mine = probe / f"{run[0]}-rank{dist.get_rank():05d}"
    mine.touch()
    dist.barrier(group=group)
    seen = torch.tensor([len(list(probe.glob(f"{run[0]}-rank*")))])
    dist.all_reduce(seen, op=dist.ReduceOp.MIN, group=group)
    dist.barrier(group=group)
    mine.unlink()
    if int(seen) < dist.get_world_size():
        raise ResumeError(
            f"{folder} is not shared by all ranks (a rank saw {int(seen)} of "
            f"{dist.get_world_size()} ranks' files there): put --output on a file system every "
            "node mounts"
        )


def read_adamw_norms(ckpt_dir: Path, tag: str) -> tuple[float, float]:
    return tuple(json.loads((ckpt_dir / tag / ADAMW_NORMS).read_text()))


def optimizer_state_norms(engine: Any, replicated: bool, group: Any = None) -> tuple[float, float]:
    """The L2 norms of AdamW's two moments over the whole model: a fingerprint a resume must
    reproduce, on any rank count. `replicated`: every rank holds all of it (ZeRO-0 without
    DeepSpeed's bf16 shards)."""
    inner = engine.optimizer
    # DeepSpeed's ZeRO and bf16 wrappers hold the torch one
    while not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    sums = torch.zeros(2, dtype=torch.float64)
    for state in inner.state.values():
        for i, name in enumerate(("exp_avg", "exp_avg_sq")):
            if name in state:
                sums[i] += state[name].double().pow(2).sum().cpu()
    if not replicated:
        dist.all_reduce(sums, group=group)
    return sums[0].sqrt().item(), sums[1].sqrt().item()


def describe_norms(norms: tuple[float, float]) -> str:
    return f"AdamW state |exp_avg| {norms[0]:.9g}, |exp_avg_sq| {norms[1]:.9g}"


class Checkpointer:
    """The run's checkpoints: when one is due (every `every_steps` steps or `every_minutes` minutes
    since the last, milestones every `milestone_every_epochs` epochs), writing one and loading one.
    Saves and loads are collective."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        ckpt_dir: Path,
        engine: Any,
        replicated: bool,
        control: Any,
        say: Callable[[str], None],
    ) -> None:
        """`replicated`: every rank holds the whole optimizer state (see optimizer_state_norms)."""
        self.cfg, self.ckpt_dir, self.engine, self.replicated, self.control, self.say = \
            cfg, ckpt_dir, engine, replicated, control, say
        self.cadence = CheckpointCadence(cfg.every_steps, cfg.every_minutes)
        self.milestones = EveryEpochs(cfg.milestone_every_epochs)
        self.saved_step = -1
        engine.checkpoint_engine = DurableParts(engine.checkpoint_engine)

    def due_by_steps(self, step: int) -> bool:
        return self.cadence.due_by_steps(step)

    def due_by_clock(self) -> bool:
        """This rank's clock says a checkpoint is due: a vote, which the ranks agree on
        (`StepVote`)."""
        return self.cadence.due_by_clock()

    def save(self, state: TrainState, rank_state: dict[str, Any], milestone: bool = False) -> str:
        norms = optimizer_state_norms(self.engine, self.replicated, self.control)
        tag = save_checkpoint(
            self.engine,
            self.ckpt_dir,
            state,
            rank_state,
            self.cfg.keep_last,
            norms,
            self.control,
            milestone,
        )
        self.cadence.saved()
        self.saved_step = state.step
        self.say(
            f"{'milestone ' if milestone else ''}checkpoint {self.ckpt_dir / tag}; "
            f"{describe_norms(norms)}"
        )
        return tag

    def load(
        self, tag: str, universal: bool, gradient_clipping: float
    ) -> tuple[TrainState, dict[str, Any]]:
        """The saved run state of `tag` and this rank's saved state (its streams None on another
        rank count)."""
        rank_state = load_checkpoint(self.engine, self.ckpt_dir, tag, universal, gradient_clipping)
        state = read_train_state(self.ckpt_dir, tag)
        self.saved_step = state.step
        return state, rank_state

    def norms(self) -> tuple[float, float]:
        return optimizer_state_norms(self.engine, self.replicated, self.control)
