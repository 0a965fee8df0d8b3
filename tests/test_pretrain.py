"""The trainer's parts that need no run: the metric window's divergence check, the cadences, the
exit codes."""

import math

import pytest
import torch
import torch.distributed as dist

from train.cadence import CheckpointCadence, EveryEpochs, EverySteps
from train.metrics import MetricWindow
from train.outcome import RunEnd


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


def test_every_way_a_run_ends_has_its_own_exit_code():
    codes = [end.value for end in RunEnd]
    assert len(set(codes)) == len(codes) and RunEnd.FINISHED == 0
    # Python's own status for an uncaught exception: a bug, never a run's outcome
    assert 1 not in codes
    assert (RunEnd.REFUSED, RunEnd.STOPPED, RunEnd.DIVERGED, RunEnd.FAILED) == (2, 3, 4, 5)
