"""The run-health parts on their own: the watchdog's timing and report, the straggler rule, the
spike rule."""

import os
import subprocess
import threading
import time

import torch

from tests.helpers import REPO
from train.health import RankTimes, SpikeDetector, Watchdog, WindowTimes


def test_the_watchdog_reports_a_silent_rank_with_its_stacks_and_allows_slow_phases(tmp_path):
    fired = threading.Event()
    dog = Watchdog(1.0, tmp_path, rank=3, step=lambda: 41, on_hang=fired.set)
    dog.beat()
    with dog.slow_phase("a checkpoint"):  # 4 x 1 s allowed: 2 s of it is no hang
        time.sleep(2.0)
    assert not fired.is_set()
    for _ in range(6):  # steps that keep coming are no hang either
        time.sleep(0.25)
        dog.beat()
    assert not fired.is_set()
    assert fired.wait(6.0)  # then silence
    report = (tmp_path / "hangs" / "step00000041-rank00003.txt").read_text()
    assert "rank 3 on " in report and "no progress for" in report and "after step 41" in report
    # every thread's stack, this test's among them
    assert "Thread" in report and "test_health.py" in report
    dog.close()


def test_a_watchdog_of_zero_never_fires(tmp_path):
    fired = threading.Event()
    dog = Watchdog(0, tmp_path, rank=0, step=lambda: 0, on_hang=fired.set)
    time.sleep(0.3)
    assert not fired.is_set() and not dog.overdue()


def straggler_rule(ranks: int, margin: float = 0.25, windows: int = 2) -> RankTimes:
    """The rule alone: no process group to gather over (the summary of gathered figures is what is
    tested)."""
    return RankTimes(torch.device("cpu"), None, [f"node{i}" for i in range(ranks)], margin, windows)


def test_a_rank_slowest_by_the_margin_for_several_windows_is_named():
    ranks = straggler_rule(4)
    slow = [WindowTimes(1.0, 0.1, None), WindowTimes(1.0, 0.0, None), WindowTimes(2.0, 0.5, None),
            WindowTimes(1.1, 0.0, None)]
    record, warning = ranks._summary(slow)
    # once: no name yet
    assert record["slowest_rank"] == 2 and record["slowest_host"] == "node2" and warning is None
    assert record["rank_forward_s_max"] == 2.0 and record["rank_forward_s_median"] == 1.05
    assert record["rank_data_wait_s_max"] == 0.5 and record["peak_memory_gb"] is None
    _, warning = ranks._summary(slow)
    assert warning and warning.startswith(
        "straggler: rank 2 on node2 has been the slowest for 2 windows"
    )
    even = [WindowTimes(1.0, 0.0, 3.5), WindowTimes(1.1, 0.0, 4.0), WindowTimes(1.05, 0.0, 3.0)]
    # within the margin: no straggler, and the count starts over
    record, warning = ranks._summary(even)
    assert warning is None and ranks.slowest_run == (-1, 0) and record["peak_memory_gb"] == 4.0


def test_spikes_are_judged_against_the_recent_median_once_it_is_known():
    detector = SpikeDetector(loss_factor=0.5, grad_factor=10.0, history=4)
    falling = [1.0, 0.9, 0.8, 0.7]
    # learning the history: quiet
    assert [detector.check(loss, 1.0) for loss in falling] == [None] * 4
    assert detector.check(0.72, 1.2) is None  # noise
    spike = detector.check(1.4, 1.0)  # 1.4 > 1.5 x median(0.9, 0.8, 0.7, 0.72) = 1.14
    assert spike and spike["cause"] == "loss" and spike["median_loss"] == 0.76
    grad = SpikeDetector(loss_factor=0.5, grad_factor=10.0, history=3)
    for loss in (1.0, 1.0, 1.0):
        grad.check(loss, 0.5)
    assert grad.check(1.0, 6.0)["cause"] == "grad_norm" and grad.check(1.0, 0.6) is None
    off = SpikeDetector(loss_factor=0.0, grad_factor=0.0, history=2)
    assert [off.check(loss, 1.0) for loss in (1.0, 1.0, 100.0)] == [None] * 3


def test_the_straggler_named_is_the_same_rank_slowest_for_the_windows_in_a_row():
    ranks = straggler_rule(3, windows=2)

    def slow(rank: int) -> list[WindowTimes]:
        return [WindowTimes(3.0 if r == rank else 1.0, 0.0, None) for r in range(3)]

    assert ranks._summary(slow(2))[1] is None
    assert ranks._summary(slow(1))[1] is None  # two slow windows, but of two different ranks
    warning = ranks._summary(slow(1))[1]
    assert warning and warning.startswith(
        "straggler: rank 1 on node1 has been the slowest for 2 windows"
    )


def test_a_gradient_norm_just_above_the_factor_times_the_median_is_a_spike():
    def detector() -> SpikeDetector:
        spikes = SpikeDetector(loss_factor=0.5, grad_factor=10.0, history=3)
        for _ in range(3):
            spikes.check(1.0, 0.5)  # the median: 0.5, the threshold 10 x 0.5 = 5.0
        return spikes

    assert detector().check(1.0, 4.9) is None
    spike = detector().check(1.0, 5.1)
    assert spike and spike["cause"] == "grad_norm" and spike["median_grad_norm"] == 0.5
    # the loss check off, not the norm's
    loss_off = SpikeDetector(loss_factor=0.0, grad_factor=10.0, history=3)
    for _ in range(3):
        loss_off.check(1.0, 0.5)
    assert loss_off.check(100.0, 1.0) is None and loss_off.check(1.0, 5.1)["cause"] == "grad_norm"


def test_a_loss_is_a_spike_only_above_one_plus_the_factor_times_the_median():
    def detector() -> SpikeDetector:
        spikes = SpikeDetector(loss_factor=0.5, grad_factor=10.0, history=3)
        for _ in range(3):
            spikes.check(1.0, 0.5)  # the median loss: 1.0, the threshold (1 + 0.5) x 1.0 = 1.5
        return spikes

    # above the median, below the threshold: a noisy window, not a spike
    assert detector().check(1.4, 0.5) is None
    spike = detector().check(1.6, 0.5)
    assert spike and spike["cause"] == "loss" and spike["median_loss"] == 1.0


def slurm_job(tmp_path, slurm: dict[str, str], *args: str, exits: int, restarts: int = 0,
              latest: str = "step00000008") -> tuple[int, str, str, bool]:
    """train/slurm.sbatch with stand-in srun and scontrol (`slurm`: tests.runs.fake_slurm) and a
    stand-in trainer that exits `exits`, the run folder holding checkpoint `latest`: the job's exit
    status, its output, the options srun was given, and whether the job requeued itself."""
    trainer = tmp_path / "trainer"
    trainer.write_text(
        f'#!/usr/bin/env bash\necho "$@" > {tmp_path}/argv.$SLURM_PROCID\nexit {exits}\n'
    )
    trainer.chmod(0o755)
    output = tmp_path / "run"
    (output / "checkpoints").mkdir(parents=True, exist_ok=True)
    (output / "checkpoints" / "latest").write_text(latest)
    requeued = tmp_path / "slurm" / "requeued"
    requeued.unlink(missing_ok=True)
    env = {**os.environ, **slurm, "MAEFLOW_PYTHON": str(trainer), "MAEFLOW_REPO": str(REPO),
           "SLURM_RESTART_COUNT": str(restarts)}
    done = subprocess.run(
        ["bash", str(REPO / "train" / "slurm.sbatch"), str(tmp_path), str(output), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    srun = (tmp_path / "slurm" / "srun_options").read_text()
    return done.returncode, done.stdout + done.stderr, srun, requeued.exists()


def test_the_slurm_script_ends_a_step_on_a_dead_rank_and_requeues_only_what_will_not_recur(
    tmp_path,
):
    from tests.runs import fake_slurm

    slurm = fake_slurm(tmp_path / "slurm", tasks=2)
    code, out, srun, requeued = slurm_job(tmp_path, slurm, exits=3)
    # a dead rank ends the step in 2 min
    assert (code, requeued) == (3, True) and "--wait=120" in srun.split()
    # no --config: the ViT-H pre-training preset
    assert "train/pretrain.py" in (tmp_path / "argv.0").read_text()
    # the cap (MAEFLOW_MAX_REQUEUES)
    assert slurm_job(tmp_path, slurm, exits=3, restarts=20)[3] is False
    # refused, diverged, failed, crashed, killed: each would recur
    for failure in (2, 4, 5, 1, 137):
        assert slurm_job(tmp_path, slurm, exits=failure)[3] is False, failure
    code, out, _, requeued = slurm_job(tmp_path, slurm, exits=6)  # a hang: requeued once
    assert requeued and "requeueing" in out
    # hung again at the same checkpoint: it would recur
    code, out, _, requeued = slurm_job(tmp_path, slurm, exits=6)
    assert not requeued and "would recur" in out, out
    # progress since: requeued again
    assert slurm_job(tmp_path, slurm, exits=6, latest="step00000012")[3] is True
    # Fine-tuning: the config's task line picks its script.
    slurm_job(tmp_path, slurm, "--config", "finetune_vit_b16", exits=0)
    argv = (tmp_path / "argv.1").read_text().split()
    assert argv[0] == "train/finetune.py" and argv[argv.index("--config") + 1] == "finetune_vit_b16"
