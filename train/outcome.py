"""How a run ends, as the exit status every rank returns (README, "Exit codes"): which errors are
the user's to fix before anything runs (a refusal: exit 2), which errors while training the data,
the disk, the machine or the network caused (a failure: fix what it names, then resume), and an
out-of-memory apart. Anything else is a bug in
maeflow: it propagates with its traceback (status 1), on the rank where it happened."""

from __future__ import annotations

import errno
from enum import IntEnum

import torch
import torch.distributed as dist

from model.weights import WeightsError
from pipeline.errors import DamagedImage, DamagedIndex, DataError, StorageError
from pipeline.formats import FormatError
from train.checkpoint import CheckpointNotWritten, ResumeError
from train.config import ConfigError
from train.distributed import DeviceError, JoinError
from train.health import HUNG_EXIT_STATUS
from train.preflight import PreflightError
from train.run_folder import FolderInUse


class RunEnd(IntEnum):
    """train/slurm.sbatch requeues STOPPED and HUNG."""

    FINISHED = 0  # the schedule or --max-steps is done
    # a bad argument, config, data path or checkpoint: nothing was trained, the folder is unchanged
    REFUSED = 2
    STOPPED = 3  # a signal stopped the run after a checkpoint: resume it
    DIVERGED = 4  # a non-finite loss; the last good checkpoint is intact
    # damaged data, a bucket that stopped answering, a full disk, a lost rank, a collective that
    # timed out: fix what it names, resume
    FAILED = 5
    HUNG = HUNG_EXIT_STATUS  # 6: the watchdog saw no progress (stacks in OUTPUT/hangs/): resume it
    # the step did not fit in memory: lower the local batch or recompute activations, then resume
    OUT_OF_MEMORY = 7


# What the user can fix: a config, a command, data or weights that do not fit, a checkpoint that
# cannot resume as asked, a port in use, GPUs its torch cannot use, a node without what the run
# needs, a folder another run holds, a file that is not there or in a format this maeflow does not
# read, a bucket that cannot be read.
REFUSALS = (
    ConfigError,
    ResumeError,
    JoinError,
    DeviceError,
    PreflightError,
    FolderInUse,
    FileNotFoundError,
    DataError,
    StorageError,
    FormatError,
    WeightsError,
)


# A collective that lost its peer or its time says so only in its message where the backend raises a
# RuntimeError (gloo's "Connection closed by peer", NCCL's watchdog); torch's own distributed errors
# have types.
_LOST_PEER = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "timeout",
    "nccl error",
    "socket",
    "unreachable",
)
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def failure_kind(err: BaseException) -> str | None:
    """What caused an error raised while training, where it is not a bug: "memory" (the step did not
    fit), "data" (damaged shards or images), "storage" (a bucket that stopped serving the shards),
    "disk" (no room to write), "peer" (a lost rank, a collective that timed out).
    None: a bug, which must propagate with its traceback."""
    message = str(err).lower()
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or any(
        m in message for m in _OUT_OF_MEMORY
    ):
        return "memory"
    if isinstance(err, (DataError, DamagedIndex, DamagedImage)):
        return "data"
    if isinstance(err, StorageError):
        return "storage"
    if isinstance(err, CheckpointNotWritten) or (
        isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    ):
        return "disk"
    if isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(m in message for m in _LOST_PEER)
    ):
        return "peer"
    return None
