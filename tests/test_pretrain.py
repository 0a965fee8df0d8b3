"""The trainer's parts that need no run: the metric window's divergence check, the cadences, the
exit codes."""

import errno
import math

import pytest
import torch
import torch.distributed as dist

from pipeline.errors import DamagedImage, DamagedIndex, DataError, StorageError
from train.cadence import CheckpointCadence, EveryEpochs, EverySteps
from train.checkpoint import CheckpointNotWritten
from train.metrics import MetricWindow
from train.outcome import RunEnd, failure_kind


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_any_non_finite_loss_is_divergence_at_the_first_step_it_appears(one_rank_group, bad):
    window = MetricWindow(torch.device("cpu"))
    for step, loss in ((11, 0.5), (12, bad), (13, 0.4), (14, bad)):
        window.add(torch.tensor(loss), step)
    _, bad_step = window.reduce()
    assert bad_step == 12


def test_finite_losses_average_over_forward_passes(one_rank_group):
    window = MetricWindow(torch.device("cpu"))
    for step, loss in ((1, 1.0), (1, 3.0), (2, 5.0)):
        window.add(torch.tensor(loss), step)
    assert window.reduce() == (3.0, None)
    window.restart(0.0)
    window.add(torch.tensor(7.0), 3)
    assert window.reduce() == (7.0, None)


def test_cadences_say_when_work_is_due():
    assert [s for s in range(1, 13) if EverySteps(4).due(s)] == [4, 8, 12]
    assert not any(EverySteps(0).due(s) for s in range(1, 10))
    assert [e for e in range(1, 7) if EveryEpochs(2).due(e)] == [2, 4, 6]
    clock = CheckpointCadence(steps=5, minutes=0)
    assert [s for s in range(1, 11) if clock.due_by_steps(s)] == [
        5,
        10,
    ] and not clock.due_by_clock()
    by_time = CheckpointCadence(steps=0, minutes=1)
    assert not by_time.due_by_clock() and not by_time.due_by_steps(5)
    by_time.last_save -= 50  # 50 s into a minute: not yet
    assert not by_time.due_by_clock()
    by_time.last_save -= 11
    assert by_time.due_by_clock()
    by_time.saved()
    assert not by_time.due_by_clock()


@pytest.mark.parametrize("error, kind", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
     "memory"),
    (DamagedImage("train-000002.tar: sample 000000123 does not decode"), "data"),
    (DamagedIndex("train-000002.idx lists 9 samples, the manifest 10"), "data"),
    (DataError("val.json names other classes"), "data"),
    (StorageError("s3://shards/train-000002.tar: Could not connect to the endpoint URL"),
     "storage"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk"),
    (CheckpointNotWritten("no room for the next checkpoint"), "disk"),
    (RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:1234"),
     "peer"),
    (dist.DistNetworkError("failed to recv, got 0 bytes"), "peer"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x192 and 384x192)"), None),
    (OSError(errno.EACCES, "Permission denied"), None),
    (ValueError("too many values to unpack"), None),
    (KeyError("loss"), None),
])
def test_an_error_while_training_is_a_failure_of_its_kind_or_a_bug(error, kind):
    """What ends a run as "fix and resume" (each kind its own line), and what is a bug (None: it
    propagates with its traceback)."""
    assert failure_kind(error) == kind


def test_every_way_a_run_ends_has_its_own_exit_code():
    codes = [end.value for end in RunEnd]
    assert len(set(codes)) == len(codes) and RunEnd.FINISHED == 0
    # Python's own status for an uncaught exception: a bug, never a run's outcome
    assert 1 not in codes
    assert (RunEnd.REFUSED, RunEnd.STOPPED, RunEnd.DIVERGED, RunEnd.FAILED) == (2, 3, 4, 5)
