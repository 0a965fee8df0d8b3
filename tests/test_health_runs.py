"""Run health on real CPU ranks, each started as srun starts one (no launcher to tear the others
down): a frozen rank, a killed rank, stacks on demand, a straggler, and the SLURM script itself."""

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, start_job
from tests.runs import events, fake_slurm, free_port, metrics, rank_env, run, samples_read
from train.health import SLOW_PHASE_FACTOR

pytestmark = pytest.mark.slow


def start_ranks(shards: Path, output: Path, *extra: str, world: int = 2) -> list[subprocess.Popen]:
    """The job's ranks on this machine's cores, each started by itself (so that each can be
    signalled), with the cores shared between them: two ranks each taking every core would make an
    even run uneven."""
    port = free_port()
    cmd = [
        sys.executable,
        "train/pretrain.py",
        "--config",
        "configs/tiny.toml",
        "--data",
        str(shards),
        "--output",
        str(output),
        *extra,
    ]
    return [start_job(cmd, cwd=REPO, env={**rank_env(rank, world, port), "LOCAL_RANK": str(rank),
                                          "LOCAL_WORLD_SIZE": str(world)}) for rank in range(world)]


def wait_for(condition, ranks: list[subprocess.Popen], seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline and all(p.poll() is None for p in ranks), [
            p.poll() for p in ranks
        ]
        time.sleep(0.1)


def logged_steps(output: Path) -> int:
    return len(metrics(output)) if (output / "metrics.jsonl").is_file() else 0


def test_a_frozen_rank_ends_both_ranks_as_hung_with_stacks_and_the_run_resumes(shards, tmp_path):
    output = tmp_path / "frozen"
    timeout = 8  # seconds without a step; start-up may take 4 x that
    ranks = start_ranks(
        shards,
        output,
        "--max-steps",
        "100000",
        "--log-every",
        "1",
        "--set",
        f"runtime.hang_timeout_s={timeout}",
        "--set",
        "checkpoint.every_steps=2",
        "--set",
        "log.sample_ids=true",
    )
    wait_for(
        lambda: logged_steps(output) >= 3 and (output / "checkpoints" / "latest").is_file(), ranks
    )
    # a rank that stopped answering: a stuck GPU, a dead NFS mount
    ranks[1].send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    out0, _ = ranks[0].communicate(timeout=120)
    waited = time.monotonic() - frozen_at
    assert ranks[0].returncode == 6, out0[-3000:]  # hung: train/slurm.sbatch requeues it
    # Within the timeout (4x when the freeze caught it in a checkpoint) and the watchdog's check
    # interval; its last step may have come a moment before the freeze.
    assert timeout - 1 <= waited < SLOW_PHASE_FACTOR * timeout + 15, waited
    while time.monotonic() - frozen_at < SLOW_PHASE_FACTOR * timeout + 2:
        time.sleep(0.5)  # past its limit in any phase
    ranks[1].send_signal(signal.SIGCONT)  # as it wakes it finds itself past its limit
    out1, _ = ranks[1].communicate(timeout=120)
    assert ranks[1].returncode == 6, out1[-3000:]
    reports = {p.name.split("-")[1]: p.read_text() for p in (output / "hangs").iterdir()}
    assert set(reports) == {"rank00000.txt", "rank00001.txt"}
    assert "HUNG: rank 0 on" in out0 and "no progress for" in reports["rank00000.txt"]
    for report in reports.values():  # where each rank was: in the training loop's collective calls
        assert "Thread" in report and "train/pretrain.py" in report and "run_epoch" in report, (
            report[-2000:]
        )
    latest = (output / "checkpoints" / "latest").read_text()
    run(
        shards,
        output,
        "--max-steps",
        "12",
        "--log-every",
        "1",
        "--set",
        f"runtime.hang_timeout_s={timeout}",
        "--set",
        "checkpoint.every_steps=2",
        "--set",
        "log.sample_ids=true",
        "--resume",
    )
    assert events(output, "resumed")[-1]["from"] == latest
    assert metrics(output)[-1]["step"] == 12
    for epoch in range(3):  # 4 steps an epoch: every sample at most once per epoch, across the hang
        keys = samples_read(output, range(4 * epoch + 1, 4 * epoch + 5))
        assert len(keys) == len(set(keys)) == 64


def test_a_killed_rank_stops_the_other_in_bounded_time_naming_it(shards, tmp_path):
    output = tmp_path / "killed"
    ranks = start_ranks(shards, output, "--max-steps", "100000", "--log-every", "1",
                        "--set", "runtime.hang_timeout_s=20")
    wait_for(lambda: logged_steps(output) >= 2, ranks)
    ranks[1].kill()
    killed_at = time.monotonic()
    out, _ = ranks[0].communicate(timeout=120)
    assert time.monotonic() - killed_at < 30
    # failed while training: resume once the node is back
    assert ranks[0].returncode == 5, out[-3000:]
    assert f"rank 1 (host {os.uname().nodename}, pid {ranks[1].pid}) is no longer running" in out, (
        out[-3000:]
    )


def test_stacks_on_demand_leave_the_run_unchanged_and_an_even_run_names_no_straggler(
    shards, tmp_path
):
    plain = run(shards, tmp_path / "plain", "--max-steps", "8", "--log-every", "1")
    ranks = start_ranks(shards, tmp_path / "asked", "--max-steps", "8", "--log-every", "1")
    wait_for(lambda: logged_steps(tmp_path / "asked") >= 2, ranks)
    for rank in ranks:
        rank.send_signal(signal.SIGUSR1)
    outs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outs[0][-3000:]
    assert [r["loss"] for r in metrics(tmp_path / "asked")] == [
        r["loss"] for r in metrics(tmp_path / "plain")
    ]
    dumps = sorted((tmp_path / "asked" / "stacks").iterdir())
    assert [p.name.split("-")[0] for p in dumps] == ["rank00000", "rank00001"]
    assert all("Thread" in p.read_text() and "pretrain.py" in p.read_text() for p in dumps)
    assert "straggler: rank" not in plain + outs[0]


def test_a_rank_slowed_from_outside_is_named_as_the_straggler(shards, tmp_path):
    output = tmp_path / "slowed"
    ranks = start_ranks(shards, output, "--max-steps", "100000", "--log-every", "2",
                        "--set", "log.straggler_windows=2")
    wait_for(lambda: logged_steps(output) >= 1, ranks)
    found = False
    deadline = time.monotonic() + 240
    while not found and time.monotonic() < deadline:
        for _ in range(20):  # rank 1 runs a third of the time
            ranks[1].send_signal(signal.SIGSTOP)
            time.sleep(0.1)
            ranks[1].send_signal(signal.SIGCONT)
            time.sleep(0.05)
        records = metrics(output)
        # several windows: the warning's run of 2
        found = sum(r["slowest_rank"] == 1 for r in records[1:]) >= 6
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    outs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert found, [r["slowest_rank"] for r in metrics(output)]
    assert "straggler: rank 1 on " in outs[0], outs[0][-3000:]
    # the folder is intact
    assert json.loads((output / "metrics.jsonl").read_text().splitlines()[-1])


def test_the_slurm_script_takes_a_users_arguments_from_anywhere_and_requeues_a_stopped_run(
    shards, tmp_path
):
    slurm = fake_slurm(tmp_path / "slurm", tasks=2)
    submit_dir = tmp_path / "submitted_from_here"
    submit_dir.mkdir()
    env = {**os.environ, **slurm, "SLURM_SUBMIT_DIR": str(submit_dir), "MAEFLOW_REPO": str(REPO)}
    script = REPO / "train" / "slurm.sbatch"
    args = [
        "bash",
        str(script),
        str(shards),
        "runs/mine",
        "--config",
        str(REPO / "configs" / "tiny.toml"),
        "--max-steps",
        "4",
        "--log-every",
        "1",
        "--set",
        "optim.lr=0.001",
    ]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # relative to where the job was submitted, not where it ran
    output = submit_dir / "runs" / "mine"
    cfg = json.loads((output / "config.json").read_text())
    # the user's arguments
    assert (cfg["model"]["name"], cfg["optim"]["lr"]) == ("mae_vit_tiny_patch16", 0.001)
    assert [r["step"] for r in metrics(output)] == [1, 2, 3, 4]
    # plain lines in a log file, no bar; what an operator reads in each:
    assert "\r" not in done.stdout
    line = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 4/4 epoch 0 loss [\d.]+ lr [\d.e-]+ grad [\d.e-]+ "
        r"\d+ img/s stall \d+% eta 0:00:00"
    )
    assert re.search(line, done.stdout), done.stdout[-2000:]
    # each record's wall-clock time
    assert all(dt.datetime.fromisoformat(r["time"]) for r in metrics(output))
    assert not (tmp_path / "slurm" / "requeued").exists()
    # A preempted job: SIGTERM to the job's processes; the script requeues it, and the requeue
    # resumes.
    job = start_job([*args[:6], "--max-steps", "100000", "--log-every", "1"], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 300
    while logged_steps(output) < 6:
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    session = os.getsid(job.pid)
    tasks = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if "python" in (p.info["name"] or "")
        and "train/pretrain.py" in (p.info["cmdline"] or [])
        and os.getsid(p.pid) == session
    ]
    assert len(tasks) == 2
    # what --signal=TERM@120 does before a time limit: every task of the job step
    for task in tasks:
        task.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 3, out[-3000:]
    assert (tmp_path / "slurm" / "requeued").read_text().split() == ["4242"]
    assert events(output, "resumed")[-1]["from"] == "step00000004"


@pytest.mark.parametrize(
    "kind, status, line",
    [
        ("bug", 1, "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
        ("memory", 7, "error: out of memory at step 2 on rank 1"),
        (
            "data",
            5,
            "error: damaged data at step 2 on rank 1: train-000002.tar: sample 000000123 does not "
            "decode",
        ),
        (
            "storage",
            5,
            "error: the shards' object store failed at step 2 on rank 1: "
            "s3://shards/train-000002.tar: Could not connect to the endpoint URL",
        ),
        (
            "disk",
            5,
            "error: no room to write at step 2 on rank 1: [Errno 28] No space left on device",
        ),
    ],
)
def test_an_error_inside_the_step_ends_the_run_as_what_it_is_and_the_other_rank_stops(
    shards, tmp_path, kind, status, line
):
    """Raised inside step 3's forward pass on rank 1 of 2: a bug propagates with its traceback (exit
    1), an out-of-memory says which fields lower the memory (exit 7), damaged data and a full disk
    say so (exit 5), each resumable from the last checkpoint; rank 0, waiting on its peer, stops in
    bounded time as having lost it."""
    port = free_port()
    cmd = [
        sys.executable,
        "tests/scripts/failing_task.py",
        "--config",
        "configs/tiny.toml",
        "--data",
        str(shards),
        "--output",
        str(tmp_path / "run"),
        "--log-every",
        "1",
        "--set",
        "checkpoint.every_steps=1",
    ]
    ranks = [
        start_job(
            cmd,
            cwd=REPO,
            env={
                **rank_env(rank, 2, port),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": "2",
                "MAEFLOW_TEST_FAILURE": f"1:2:{kind}",
            },
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=180)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [5, status], outs
    assert line in outs[1], outs[1][-3000:]
    assert ("Traceback" in outs[1]) == (kind == "bug"), outs[1][-3000:]
    assert "error: lost a peer at step 2 on rank 0" in outs[0] and "Traceback" not in outs[0], outs[
        0
    ][-3000:]
    if kind == "memory":
        assert (
            "lower optim.max_local_batch_size" in outs[1]
            and "model.activation_recompute=true" in outs[1]
        )
    if kind != "bug":
        assert "then continue with --resume (the last checkpoint is intact)" in outs[1]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step00000002"
