"""Real DeepSpeed runs resumed as a cluster resumes them: on other rank counts, from older
checkpoints, on two simulated nodes. Assertions read the saved state (checkpoints, metrics.jsonl
events), not log wording."""

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, start_job
from tests.runs import events, free_port, metrics, rank_env, run, samples_read
from train.checkpoint import read_adamw_norms
from train.config import load_config
from train.export import main as export_main
from train.recipe import lr_at

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "stage, precision, new_rank_counts",
    [(1, "fp32", (3,)), (0, "autocast_bf16", (3,)), (2, "bf16", (1,)), (3, "fp32", (3,))],
    ids=["zero1", "zero0-autocast", "zero2-bf16", "zero3"],
)
def test_a_run_resumes_on_another_rank_count(shards, tmp_path, stage, precision, new_rank_counts):
    """2 ranks stop mid-epoch; the run goes on with fewer or more: AdamW's state comes back
    unchanged, and the interrupted epoch's samples are read exactly once over the two runs."""
    common = (
        "--log-every",
        "1",
        "--set",
        f"runtime.zero_stage={stage}",
        "--set",
        f"runtime.precision={precision}",
        "--set",
        "optim.local_batch_size=4",
        "--set",
        "log.sample_ids=true",
    )
    first = tmp_path / "two_ranks"
    # 4 steps an epoch: stops in epoch 1 after 2 of them
    run(shards, first, "--max-steps", "6", *common)
    saved = read_adamw_norms(first / "checkpoints", "step00000006")
    for ranks in new_rank_counts:
        extra = ["--set", "optim.global_batch_size=12"] if ranks == 3 else []
        output = tmp_path / f"{ranks}_ranks"
        shutil.copytree(first, output)
        run(shards, output, "--max-steps", "10", "--resume", *common, *extra, ranks=ranks)
        (resumed,) = events(output, "resumed")
        assert (resumed["from"], resumed["world_size"], resumed["saved_world_size"]) == (
            "step00000006",
            ranks,
            2,
        )
        # the bf16 optimizer shards its master copies too
        partitioned = stage > 0 or precision == "bf16"
        assert resumed["universal"] == partitioned
        assert resumed["adamw_norms"] == pytest.approx(saved, rel=1e-6)
        if extra:
            kept = json.loads((output / "config.step00000006.json").read_text())
            assert kept["optim"]["global_batch_size"] == 16
            assert (
                json.loads((output / "config.json").read_text())["optim"]["global_batch_size"] == 12
            )
            # The schedule follows the samples seen, in epochs of the new plan (5 steps of 12 = 60
            # samples): no step back into the warm-up. The resume's record states the change and the
            # lr it implies.
            assert (resumed["saved_global_batch_size"], resumed["global_batch_size"]) == (16, 12)
            # optim.lr is set: it does not scale
            assert resumed["peak_lr"] == resumed["saved_peak_lr"] == 2e-3
            optim = load_config("configs/tiny.toml").optim
            after = [r for r in metrics(output) if r["step"] > 6]
            assert [r["lr"] for r in after] == pytest.approx(
                [lr_at((r["samples"] - 12) / 60, 2e-3, optim) for r in after]
            )
        # Epoch 1 is steps 5-8 wherever it was read: 32 samples before the stop, the rest after.
        epoch_one = samples_read(output, range(5, 9))
        assert len(epoch_one) == len(set(epoch_one))
        # only what could not fill a batch on every rank
        assert 64 - len(epoch_one) < ranks * (4 + 1)
        records = metrics(output)
        assert [r["step"] for r in records][-4:] == [7, 8, 9, 10] and records[-1]["epoch"] == 2
        assert export_main([str(output), "--to", str(tmp_path / f"{ranks}.pth")]) == 0


def test_milestones_and_going_back_to_a_checkpoint_twice_with_other_masks_and_lr(shards, tmp_path):
    output = tmp_path / "run"
    run(
        shards,
        output,
        "--max-steps",
        "10",
        "--log-every",
        "2",
        "--set",
        "checkpoint.milestone_every_epochs=1",
        "--set",
        "checkpoint.keep_last=1",
        "--set",
        "checkpoint.every_steps=3",
    )
    # 4 steps an epoch: milestones at steps 4 and 8 stay; of the rolling ones (3, 6, 9, 10) only the
    # newest.
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step*")) == [
        "step00000004",
        "step00000008",
        "step00000010",
    ]
    original_config = (output / "config.json").read_text()
    # a bare step number, as documented
    run(shards, output, "--max-steps", "6", "--log-every", "1", "--resume", "4",
        "--set", "runtime.mask_seed=1", "--set", "optim.lr=0.001")
    (branch,) = (output / "abandoned").iterdir()
    assert sorted(p.name for p in (branch / "checkpoints").iterdir()) == [
        "step00000008",
        "step00000010",
    ]
    # The abandoned branch keeps its own records and pictures; the run's metrics hold one history.
    assert [r["step"] for r in map(json.loads, (branch / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [6, 8, 9, 10]  # every 2 steps, and at each checkpoint
    assert (branch / "viz" / "reconstruction_step00000010.png").is_file()
    assert [r["step"] for r in metrics(output)] == [2, 3, 4, 5, 6]
    assert (output / "config.step00000004.json").read_text() == original_config
    assert metrics(output)[-2]["lr"] == pytest.approx(
        lr_at(4 / 4, 0.001, load_config("configs/tiny.toml").optim)
    )
    assert (checkpoints / "latest").read_text() == "step00000006"
    # Going back to the same checkpoint again: a second branch beside the first, the first config
    # still kept.
    run(shards, output, "--max-steps", "5", "--log-every", "1", "--resume", "step00000004",
        "--set", "runtime.mask_seed=2", "--set", "optim.lr=0.001")
    assert len(list((output / "abandoned").iterdir())) == 2
    assert (output / "config.step00000004.json").read_text() == original_config
    assert [r["step"] for r in metrics(output)] == [2, 3, 4, 5]
    # Refused changes leave everything as it was.
    before = sorted(str(p) for p in output.rglob("*") if "tb" not in p.parts)
    out = run(shards, output, "--max-steps", "8", "--resume", "--set", "runtime.seed=5", expect=2)
    assert "--resume cannot change runtime.seed (0 -> 5)" in out
    assert sorted(str(p) for p in output.rglob("*") if "tb" not in p.parts) == before
    assert export_main([str(output), "--to", str(tmp_path / "m.pth"), "--tag", "step00000004"]) == 0
    assert export_main([str(output), "--to", str(tmp_path / "m.pth"), "--tag", "step00000006"]) == 2


def test_two_nodes_of_two_ranks_by_torchrun_then_one_node_of_three_by_srun_then_stopped_by_a_signal(
        shards, tmp_path):
    """The README's multi-node launch, on one machine: two torchrun "nodes" (node ranks 0 and 1, one
    master address) of two ranks each. Each node's ranks have local ranks 0 and 1; only global rank
    0 writes the run's records; the epoch (4 steps of 16) reads every sample once. The run then
    continues on one node of three ranks started as srun starts them (a global batch of 12: 16 does
    not split over 3), reads its next epoch's samples at most once each, and stops on a preemption's
    SIGTERM (exit 3)."""
    output = tmp_path / "two_nodes"
    args = [
        "train/pretrain.py",
        "--config",
        "configs/tiny.toml",
        "--data",
        str(shards),
        "--output",
        str(output),
        "--log-every",
        "1",
        "--set",
        "log.sample_ids=true",
        "--set",
        "eval.every_epochs=0",
    ]
    port = free_port()
    nodes = [
        start_job(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(n),
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                *args,
                "--max-steps",
                "4",
            ],
            cwd=REPO,
        )
        for n in (0, 1)
    ]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert (output / "checkpoints" / "latest").read_text() == "step00000004"
    (started,) = events(output, "started")
    assert [(r["rank"], r["local_rank"]) for r in started["ranks"]] == [
        (0, 0),
        (1, 1),
        (2, 0),
        (3, 1),
    ]
    assert [r["step"] for r in metrics(output)] == [1, 2, 3, 4]  # one writer: each record once
    assert sorted(p.name for p in output.iterdir() if not p.name.startswith(".")) == [
        "checkpoints",
        "config.json",
        "deepspeed_config.json",
        "metrics.jsonl",
        "samples",
        "stacks",
        "tb",
        "viz",
    ]
    first_epoch = samples_read(output, range(1, 5))
    assert len(first_epoch) == len(set(first_epoch)) == 64  # every sample, once
    # The same job continued on one node of three ranks, each started directly as srun does, then
    # preempted.
    port = free_port()
    ranks = [
        start_job(
            [
                sys.executable,
                *args,
                "--max-steps",
                "100000",
                "--resume",
                "--set",
                "optim.global_batch_size=12",
            ],
            cwd=REPO,
            env={**rank_env(r, 3, port), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "3"},
        )
        for r in range(3)
    ]
    deadline = time.monotonic() + 300
    while len(metrics(output)) < 10:
        ended = [p.communicate()[0][-3000:] for p in ranks if p.poll() is not None]
        assert not ended and time.monotonic() < deadline, ended
        time.sleep(0.2)
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in ranks]
    # stopped: a scheduler requeues on this
    assert [p.returncode for p in ranks] == [3, 3, 3], outs[0][-3000:]
    (resumed,) = events(output, "resumed")
    assert (resumed["from"], resumed["world_size"]) == ("step00000004", 3)
    assert [r["local_rank"] for r in events(output, "started")[1]["ranks"]] == [0, 1, 2]
    stopped_at = int((output / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert stopped_at >= 10 and [r["step"] for r in metrics(output)] == list(
        range(1, stopped_at + 1)
    )
    second_epoch = samples_read(output, range(5, 10))  # 5 steps of 3 ranks x 4: 60 of the 64
    assert len(second_epoch) == len(set(second_epoch)) == 60


def test_an_output_folder_the_ranks_do_not_share_stops_the_run(tmp_path):
    script = Path(__file__).parent / "scripts" / "shared_folder_check.py"
    env = {"PYTHONPATH": str(REPO)}
    for folders, expect in (
        ([tmp_path / "shared"] * 2, 0),
        ([tmp_path / "node0", tmp_path / "node1"], 2),
    ):
        port = free_port()
        ranks = [
            start_job(
                [sys.executable, str(script), str(folder)], env={**rank_env(r, 2, port), **env}
            )
            for r, folder in enumerate(folders)
        ]
        outs = [p.communicate(timeout=120)[0] for p in ranks]
        assert [p.returncode for p in ranks] == [expect, expect], outs
        if expect:
            assert all(
                "is not shared by all ranks" in out and "every node mounts" in out for out in outs
            )
