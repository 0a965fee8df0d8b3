"""Real DeepSpeed runs (CPU ranks, gloo) of the tiny preset on real shards: training, logging,
stopping."""

import json
import math
import os
import signal
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from model import load_reference_weights
from tests.helpers import tiny_preset_model
from tests.runs import events, knn_records, launch, metrics, run
from tests.runs import records as records_of
from train.checkpoint import read_adamw_norms
from train.config import load_config
from train.export import main as export_main
from train.recipe import lr_at
from train.viz import fixed_images, fixed_noise

pytestmark = pytest.mark.slow

METRIC_FIELDS = {
    "step",
    "epoch",
    "samples",
    "loss",
    "lr",
    "grad_norm",
    "img_per_s",
    "data_stall_pct",
    "mfu",
    "step_time_s",
    "rank_forward_s_max",
    "rank_forward_s_median",
    "rank_data_wait_s_max",
    "rank_data_wait_s_median",
    "slowest_rank",
    "slowest_host",
    "peak_memory_gb",
    "time",
}
TINY = load_config("configs/tiny.toml")


def exported_loss_matches_engine(shards, output, tmp_path, rel: float) -> None:
    """The exported file reproduces the trained engine's loss on the fixed images and noise."""
    target = tmp_path / f"{output.name}.pth"
    assert export_main([str(output), "--to", str(target)]) == 0
    cfg = json.loads((output / "config.json").read_text())
    model = tiny_preset_model()
    assert (
        str(load_reference_weights(model, target, strict=True))
        == "all weights loaded (encoder and decoder)"
    )
    images = fixed_images(str(shards), "val", cfg["log"]["viz_images"], 64, torch.device("cpu"))
    with torch.no_grad():
        loss, _, _ = model(
            images, 0.75, fixed_noise(images.shape[0], model.num_patches, torch.device("cpu"))
        )
    engine_loss = json.loads((output / "viz" / "losses.jsonl").read_text().splitlines()[-1])["loss"]
    assert loss.item() == pytest.approx(engine_loss, rel=rel)


@pytest.mark.parametrize(
    "stage, recompute, precision",
    [(0, False, "fp32"), (1, False, "autocast_bf16"), (2, False, "bf16"), (3, True, "fp32")],
)
def test_zero_stage_trains_logs_checkpoints_and_exports(
    shards, tmp_path, stage, recompute, precision
):
    output = tmp_path / f"zero{stage}"
    run(
        shards,
        output,
        "--max-steps",
        "24",
        "--log-every",
        "4",
        "--set",
        f"runtime.zero_stage={stage}",
        "--set",
        f"model.activation_recompute={recompute}",
        "--set",
        f"runtime.precision={precision}",
        launcher="deepspeed" if stage == 0 else "ranks",  # the README's command, once
        # and the fused kernels in training, once
        env={"MAE_KERNELS": "auto"} if stage == 0 else None,
    )
    records = metrics(output)
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    # Nothing compiled at start: a rank killed while JIT-building a DeepSpeed op leaves a lock every
    # later run waits on.
    assert not (tmp_path / "torch_extensions").exists()
    # k-NN every 5 epochs (step 20) and at the end: the mean patch token at twice the 25% of chance
    # with 4 classes or more, and above that at one of them (MAE's class token learns little:
    # nothing in the loss asks it to summarise the image). 8 val images: one more right is 12.5
    # points, and bf16 rounds differently on another CPU.
    evaluations = knn_records(output)
    assert [r["step"] for r in evaluations] == [20, 24]
    assert all(
        r["knn_top1_patch_mean"] >= 0.5 and r["knn_val_samples"] == 8 for r in evaluations
    ), evaluations
    assert max(r["knn_top1_patch_mean"] for r in evaluations) > 0.5, evaluations
    for r in records:
        assert set(r) == METRIC_FIELDS
        assert r["samples"] == 16 * r["step"] and r["epoch"] == (r["step"] - 1) // 4
        # 16 images a step: the rate and step time agree, and the stall is a share of the step.
        assert (
            r["img_per_s"] == pytest.approx(16 / r["step_time_s"], rel=1e-6)
            and 0 <= r["data_stall_pct"] <= 100
        )
        # no known peak, no device memory on a CPU
        assert r["mfu"] is None and r["peak_memory_gb"] is None
        assert (
            r["slowest_rank"] in (0, 1)
            and r["rank_forward_s_max"] >= r["rank_forward_s_median"] > 0
        )
        # The gradient norm, the first sign of a loss spike, on every ZeRO stage and precision.
        assert (
            isinstance(r["grad_norm"], float)
            and 0 < r["grad_norm"] < 100
            and math.isfinite(r["grad_norm"])
        )
    # default thresholds stay quiet
    assert not [r for r in records_of(output) if r.get("event") == "loss_spike"]
    # 2 ranks x 32 samples / 8 per local batch: 4 steps per epoch, warm-up 1 epoch, 40 epochs.
    assert [r["lr"] for r in records] == pytest.approx(
        [lr_at(s / 4, 2e-3, TINY.optim) for s in (3, 7, 11, 15, 19, 23)]
    )
    assert records[-1]["loss"] < 0.85 * records[0]["loss"]
    assert (output / "checkpoints" / "latest").read_text() == "step00000024"
    assert list((output / "viz").glob("reconstruction_step00000024.png"))
    # The export holds the float32 weights; a bf16 engine computed its loss in bf16.
    exported_loss_matches_engine(
        shards, output, tmp_path, rel=1e-5 if precision == "fp32" else 3e-2
    )
    saved = json.loads((output / "deepspeed_config.json").read_text())
    assert saved["zero_optimization"]["stage"] == stage and saved["train_batch_size"] == 16
    # TensorBoard: every metric as a scalar, the reconstructions as images.
    board = EventAccumulator(str(output / "tb"), size_guidance={"images": 0})
    board.Reload()
    assert {"loss", "lr", "img_per_s", "grad_norm", "knn_top1_cls"} <= set(board.Tags()["scalars"])
    assert [e.step for e in board.Scalars("loss")] == [4, 8, 12, 16, 20, 24]
    assert "reconstruction" in board.Tags()["images"]


def test_the_peak_lr_follows_the_linear_scaling_rule(shards, tmp_path):
    """What every preset relies on: with optim.lr unset, the peak is blr x global batch / 256."""
    output = tmp_path / "blr"
    run(
        shards,
        output,
        "--max-steps",
        "6",
        "--log-every",
        "1",
        "--set",
        "optim.lr=0",
        "--set",
        "optim.blr=0.032",
        # 8 per rank x 2 accumulation x 2 ranks: 2 steps an epoch
        "--set",
        "optim.global_batch_size=32",
    )
    peak = 0.032 * 32 / 256
    assert [r["lr"] for r in metrics(output)] == pytest.approx(
        [lr_at(s / 2, peak, TINY.optim) for s in range(6)]
    )


def test_stopped_and_resumed_run_matches_an_uninterrupted_one_bitwise(shards, tmp_path):
    common = (
        "--log-every",
        "1",
        "--set",
        "optim.local_batch_size=4",
        "--set",
        "runtime.zero_stage=2",
    )
    run(shards, tmp_path / "whole", "--max-steps", "12", *common)
    run(shards, tmp_path / "split", "--max-steps", "6", *common)
    assert (
        json.loads((tmp_path / "split" / "deepspeed_config.json").read_text())[
            "gradient_accumulation_steps"
        ]
        == 2
    )
    run(shards, tmp_path / "split", "--max-steps", "12", "--resume", *common)
    (resumed,) = events(tmp_path / "split", "resumed")
    assert (resumed["from"], resumed["step"], resumed["world_size"]) == ("step00000006", 6, 2)
    assert resumed["adamw_norms"] == list(
        read_adamw_norms(tmp_path / "split" / "checkpoints", "step00000006")
    )
    whole = [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "whole")]
    split = [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "split")]
    assert len(whole) == 12 and split == whole
    # Weights exported from a run start another one (the way to a new model size or recipe).
    assert export_main([str(tmp_path / "split"), "--to", str(tmp_path / "weights.pth")]) == 0
    out = run(shards, tmp_path / "one_rank", "--max-steps", "2", "--log-every", "1",
              "--set", f"model.init={tmp_path / 'weights.pth'}", ranks=1)
    assert (
        f"initialised from {tmp_path / 'weights.pth'}: all weights loaded (encoder and decoder)"
        in out
    )
    assert metrics(tmp_path / "one_rank")[0]["loss"] < 0.9 * metrics(tmp_path / "whole")[0]["loss"]


def wait_for_steps(proc, output, steps: int) -> None:
    deadline = time.monotonic() + 300
    while not ((output / "metrics.jsonl").is_file() and len(metrics(output)) >= steps):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.2)


def test_sigterm_finishes_the_step_checkpoints_and_exits_cleanly(shards, tmp_path):
    output = tmp_path / "preempted"
    proc = launch(shards, output, "--max-steps", "100000", "--log-every", "1", launcher="deepspeed")
    wait_for_steps(proc, output, 3)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or Ctrl-C does: every process of the job
    # the launcher itself was signalled too: its status is its own
    out, _ = proc.communicate(timeout=300)
    assert "stopped: step" in out, out[-4000:]
    tag = (output / "checkpoints" / "latest").read_text()
    step = json.loads((output / "checkpoints" / tag / "train_state.json").read_text())["step"]
    assert step >= 3 and metrics(output)[-1]["step"] == step
    # the normal ending ran
    assert (output / "viz" / f"reconstruction_step{step:08d}.png").is_file()
    run(shards, output, "--max-steps", str(step + 2), "--resume", "--log-every", "1")
    assert events(output, "resumed")[-1]["from"] == tag and metrics(output)[-1]["step"] == step + 2


def test_a_signal_to_one_rank_stops_every_rank_after_a_checkpoint(shards, tmp_path):
    """The ranks vote each step: one rank's SIGTERM (a node's own preemption notice) stops them all
    together."""
    import psutil

    output = tmp_path / "one_rank_signalled"
    proc = launch(shards, output, "--max-steps", "100000", "--log-every", "1", launcher="deepspeed")
    wait_for_steps(proc, output, 2)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             # the ranks, not the launchers
             if any(arg.startswith("--local_rank") for arg in p.cmdline())]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-4000:]
    tag = (output / "checkpoints" / "latest").read_text()
    saved = json.loads((output / "checkpoints" / tag / "train_state.json").read_text())
    assert saved["step"] == metrics(output)[-1]["step"] >= 2 and saved["world_size"] == 2
    assert sorted(p.name for p in (output / "checkpoints" / tag).glob("rank*.pt")) == [
        "rank00000.pt",
        "rank00001.pt",
    ]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    output = tmp_path / "diverged"
    out = run(shards, output, "--max-steps", "20", "--log-every", "10", "--set", "optim.lr=1e30",
              "--set", "optim.warmup_epochs=0", "--set", "checkpoint.every_steps=1", expect=4)
    assert (
        "non-finite loss at step 2: stopping. The last good checkpoint (step00000001) is left "
        "intact"
        in out
    )
    assert (output / "checkpoints" / "latest").read_text() == "step00000001"
    assert not (output / "checkpoints" / "step00000002").exists()
