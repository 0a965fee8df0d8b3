"""How a run ends, as the exit status every rank returns (README, "Exit codes"), and which errors are the user's
to fix (a refusal: exit 2). Anything else is a bug in maeflow: it propagates with its traceback (status 1)."""

from __future__ import annotations

from enum import IntEnum

from model.weights import WeightsError
from pipeline.errors import DataError
from train.checkpoint import ResumeError
from train.config import ConfigError
from train.distributed import DeviceError, JoinError
from train.health import HUNG_EXIT_STATUS
from train.preflight import PreflightError
from train.run_folder import FolderInUse


class RunEnd(IntEnum):
    """train/slurm.sbatch requeues STOPPED and HUNG."""

    FINISHED = 0  # the schedule or --max-steps is done
    REFUSED = 2  # a bad argument, config, data path or checkpoint: nothing was trained, the folder is unchanged
    STOPPED = 3  # a signal stopped the run after a checkpoint: resume it
    DIVERGED = 4  # a non-finite loss; the last good checkpoint is intact
    FAILED = 5  # an error while training (damaged data, a full disk, a lost rank): fix what it names, then resume
    HUNG = HUNG_EXIT_STATUS  # 6: the watchdog saw no progress (stacks in OUTPUT/hangs/): resume it


# What the user can fix: a config, a command, data or weights that do not fit, a checkpoint that cannot resume as
# asked, a port in use, GPUs its torch cannot use, a node without what the run needs, a folder another run holds, a
# file that is not there.
REFUSALS = (ConfigError, ResumeError, JoinError, DeviceError, PreflightError, FolderInUse, FileNotFoundError,
            DataError, WeightsError)
