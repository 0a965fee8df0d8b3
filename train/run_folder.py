"""A run's output folder: who may write it, what counts as a run there, and how a branch is set
aside.

    OUTPUT/
        config.json, deepspeed_config.json   the resolved configs of the current branch
        config.step00001200.json            the config before a resume at step 1200 changed it
        metrics.jsonl, viz/, samples/, tb/   what the run logged
        checkpoints/                         see train.checkpoint
        abandoned/<when>-after-step00001200/ a branch a resume left behind: its newer checkpoints,
        the
                                             metrics records, reconstructions and sample logs of its
                                             steps after 1200
        .lock                                held by the live run's rank 0

The rules: nothing in the folder is deleted or overwritten without a copy that says why; a second
live run is refused; a lock left by a dead run is free (the operating system drops a dead process's
lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from pipeline.atomic import atomic_write_text
from train.checkpoint import complete_tags
from train.viz import reconstructions_after

LOCK = ".lock"
# a folder holding these holds a run, even before its first checkpoint
RUN_FILES = ("config.json", "metrics.jsonl")
RECORD_LOGS = ("metrics.jsonl", "viz/losses.jsonl")  # JSON lines, each with the step it belongs to
# log.sample_ids: `<step> <sample keys...>` lines, one file per rank
SAMPLE_LOGS = "samples/rank*.txt"


class FolderInUse(RuntimeError):
    """Another live run holds the output folder."""


def lock_folder(folder: Path) -> IO[str]:
    """Take the folder's lock for this process's lifetime (keep the returned file open); FolderInUse
    if a live run holds it. flock is released by the kernel when its holder dies, so a killed run's
    lock never blocks the requeued job."""
    folder.mkdir(parents=True, exist_ok=True)
    # held open for the run: closing it releases the lock
    handle = open(folder / LOCK, "a+")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUse(
            f"{folder} is in use by a live run ({holder}): stop that run first, or choose another "
            "--output"
        ) from None
    # a file system without locks (some parallel file systems mount without flock)
    except OSError as err:
        print(
            f"warning: {folder} cannot be locked ({err.strerror}): nothing stops a second run from "
            "writing there"
        )
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(
        f"host {socket.gethostname()} pid {os.getpid()} since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    handle.flush()
    return handle


def existing_run(folder: Path) -> str | None:
    """What shows that `folder` already holds a run (a checkpoint, a config or metrics), or None."""
    tags = complete_tags(folder / "checkpoints")
    if tags:
        return f"checkpoint {tags[-1]}"
    found = [name for name in RUN_FILES if (folder / name).is_file()]
    return ", ".join(found) or None


def set_aside_branch(folder: Path, step: int, checkpoint_tags: list[str]) -> Path | None:
    """Move what a run did after `step` into abandoned/<when>-after-step<step>/: the named
    checkpoints, the records of later steps (metrics.jsonl, viz/losses.jsonl, the samples each rank
    read) and the reconstructions of later steps. Returns that folder, or None when there was
    nothing to move."""
    later_images = reconstructions_after(folder / "viz", step)
    logs = {name: _split_records(folder / name, step, _json_step) for name in RECORD_LOGS}
    logs |= {str(path.relative_to(folder)): _split_records(path, step, _sample_line_step)
             for path in sorted(folder.glob(SAMPLE_LOGS))}
    if not (checkpoint_tags or later_images or any(later for _, later in logs.values())):
        return None
    branch = folder / "abandoned" / f"{time.strftime('%Y%m%d-%H%M%S')}-after-step{step:08d}"
    copies = 1
    while branch.exists():
        copies += 1
        branch = branch.with_name(f"{time.strftime('%Y%m%d-%H%M%S')}-after-step{step:08d}.{copies}")
    (branch / "checkpoints").mkdir(parents=True)
    (branch / "viz").mkdir()
    for tag in checkpoint_tags:
        os.replace(folder / "checkpoints" / tag, branch / "checkpoints" / tag)
    for image in later_images:
        os.replace(image, branch / "viz" / image.name)
    for name, (kept, later) in logs.items():
        if later:
            (branch / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(branch / name, "".join(later))
            atomic_write_text(folder / name, "".join(kept))
    return branch


def _split_records(
    path: Path, step: int, step_of: Callable[[str], int | None]
) -> tuple[list[str], list[str]]:
    """A log's lines at or before `step`, and after it; a line cut by a crash (`step_of` gives None)
    belongs to no step and is left out of both."""
    if not path.is_file():
        return [], []
    kept, later = [], []
    for line in path.read_text().splitlines(keepends=True):
        record_step = step_of(line)
        if record_step is not None:
            (later if record_step > step else kept).append(line)
    return kept, later


def _json_step(line: str) -> int | None:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return None


def _sample_line_step(line: str) -> int | None:
    first = line.split(" ", 1)[0]
    return int(first) if line.endswith("\n") and first.isdigit() else None


def keep_config(folder: Path, step: int) -> Path:
    """Rename config.json to config.step<step>.json, never over an earlier copy; returns the new
    name."""
    target = folder / f"config.step{step:08d}.json"
    copy = 1
    while target.exists():
        copy += 1
        target = folder / f"config.step{step:08d}.{copy}.json"
    os.replace(folder / "config.json", target)
    return target
