"""Real two-rank DeepSpeed runs (CPU, gloo) of the tiny preset on real shards."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import load_reference_weights
from pipeline.build_shards import main as build_shards
from pipeline.sample_data import main as sample_data
from tests.helpers import REPO, start_job, tiny_preset_model
from train.config import ConfigError, OptimConfig, TrainConfig, load_config, plan_batch
from train.engine import compile_blocks, deepspeed_config
from train.export import main as export_main
from train.pretrain import main as pretrain_main
from train.recipe import build_optimizer, lr_at
from train.viz import fixed_images, fixed_noise

DEEPSPEED = Path(sys.executable).with_name("deepspeed")
METRIC_FIELDS = {"step", "epoch", "samples", "loss", "lr", "grad_norm", "img_per_s", "data_stall_pct", "mfu",
                 "step_time_s"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    sample_data([str(root / "images"), "--classes", "4", "--train-per-class", "16", "--val-per-class", "2"])
    for split in ("train", "val"):
        assert build_shards([str(root / "images" / split), str(root / "shards"), "--split", split,
                             "--shard-size-mb", "0.5", "--workers", "1", "--quiet"]) == 0
    return root / "shards"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(shards: Path, output: Path, *extra: str, ranks: int = 2) -> subprocess.Popen:
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port()), "train/pretrain.py",
           "--config", "configs/tiny.toml", "--data", str(shards), "--output", str(output), *extra]
    env = dict(os.environ, PATH=f"{DEEPSPEED.parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(output.parent / "torch_extensions"))
    return start_job(cmd, cwd=REPO, env=env)


def run(shards: Path, output: Path, *extra: str, ranks: int = 2, expect: int = 0) -> str:
    proc = launch(shards, output, *extra, ranks=ranks)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect, out[-4000:]
    return out


def metrics(output: Path) -> list[dict]:
    """The training records of metrics.jsonl (k-NN evaluations are in it too: `knn_records`)."""
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


def knn_records(output: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "knn_top1_cls" in r]


def exported_loss_matches_engine(shards: Path, output: Path, tmp_path: Path, rel: float) -> None:
    """The exported file reproduces the trained engine's loss on the fixed images and noise."""
    target = tmp_path / f"{output.name}.pth"
    assert export_main([str(output), "--to", str(target)]) == 0
    cfg = json.loads((output / "config.json").read_text())
    model = tiny_preset_model()
    assert str(load_reference_weights(model, target, strict=True)) == "all weights loaded (encoder and decoder)"
    images = fixed_images(str(shards), "val", cfg["log"]["viz_images"], 64, torch.device("cpu"))
    with torch.no_grad():
        loss, _, _ = model(images, 0.75, fixed_noise(images.shape[0], model.num_patches, torch.device("cpu")))
    engine_loss = json.loads((output / "viz" / "losses.jsonl").read_text().splitlines()[-1])["loss"]
    assert loss.item() == pytest.approx(engine_loss, rel=rel)


@pytest.mark.parametrize("stage, recompute, precision",
                         [(0, False, "fp32"), (1, False, "autocast_bf16"), (2, False, "bf16"), (3, True, "fp32")])
def test_zero_stage_trains_logs_checkpoints_and_exports(shards, tmp_path, stage, recompute, precision):
    output = tmp_path / f"zero{stage}"
    run(shards, output, "--max-steps", "24", "--log-every", "4", "--set", f"runtime.zero_stage={stage}",
        "--set", f"model.activation_recompute={recompute}", "--set", f"runtime.precision={precision}")
    records = metrics(output)
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    # Nothing compiled at start: a rank killed while JIT-building a DeepSpeed op leaves a lock every later run waits on.
    assert not (tmp_path / "torch_extensions").exists()
    # k-NN every 5 epochs (step 20) and at the end: the mean patch token well above the 25% of chance with
    # 4 classes (MAE's class token learns little: nothing in the loss asks it to summarise the image).
    evaluations = knn_records(output)
    assert [r["step"] for r in evaluations] == [20, 24]
    assert all(r["knn_top1_patch_mean"] > 0.5 and r["knn_val_samples"] == 8 for r in evaluations), evaluations
    for r in records:
        assert set(r) == METRIC_FIELDS
        assert r["samples"] == 16 * r["step"] and r["img_per_s"] > 0 and 0 <= r["data_stall_pct"] <= 100
        assert r["mfu"] is None  # no known peak on a CPU
    # 2 ranks x 32 samples / 8 per local batch: 4 steps per epoch, warm-up 1 epoch, 40 epochs.
    assert records[0]["lr"] == pytest.approx(lr_at(3 / 4, 2e-3, load_config("configs/tiny.toml").optim))
    assert records[-1]["epoch"] == 5
    assert records[-1]["loss"] < 0.85 * records[0]["loss"]
    assert (output / "checkpoints" / "latest").read_text() == "step00000024"
    assert list((output / "viz").glob("reconstruction_step00000024.png"))
    # The export holds the float32 weights; a bf16 engine computed its loss in bf16.
    exported_loss_matches_engine(shards, output, tmp_path, rel=1e-5 if precision == "fp32" else 3e-2)
    saved = json.loads((output / "deepspeed_config.json").read_text())
    assert saved["zero_optimization"]["stage"] == stage and saved["train_batch_size"] == 16
    # TensorBoard: every metric as a scalar, the reconstructions as images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(output / "tb"), size_guidance={"images": 0})
    board.Reload()
    assert {"loss", "lr", "img_per_s", "knn_top1_cls"} <= set(board.Tags()["scalars"])
    assert [e.step for e in board.Scalars("loss")] == [4, 8, 12, 16, 20, 24]
    assert "reconstruction" in board.Tags()["images"]


def test_stopped_and_resumed_run_matches_an_uninterrupted_one_bitwise(shards, tmp_path):
    common = ("--log-every", "1", "--set", "optim.local_batch_size=4", "--set", "runtime.zero_stage=2")
    run(shards, tmp_path / "whole", "--max-steps", "12", *common)
    out = run(shards, tmp_path / "split", "--max-steps", "6", *common)
    assert "grad_accum_steps = 16 / (4 x 2 ranks) = 2" in out
    out = run(shards, tmp_path / "split", "--max-steps", "12", "--resume", *common)
    assert "resumed from step00000006 on 2 ranks: step 6, epoch 1" in out
    whole = [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "whole")]
    split = [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "split")]
    assert len(whole) == 12 and split == whole
    # Weights exported from a run start another one (the way to a new model size or recipe).
    assert export_main([str(tmp_path / "split"), "--to", str(tmp_path / "weights.pth")]) == 0
    out = run(shards, tmp_path / "one_rank", "--max-steps", "2", "--log-every", "1",
              "--set", f"model.init={tmp_path / 'weights.pth'}", ranks=1)
    assert f"initialised from {tmp_path / 'weights.pth'}: all weights loaded (encoder and decoder)" in out
    assert metrics(tmp_path / "one_rank")[0]["loss"] < 0.9 * metrics(tmp_path / "whole")[0]["loss"]


ADAMW_NORMS = re.compile(r"AdamW state \|exp_avg\| ([0-9.e+-]+), \|exp_avg_sq\| ([0-9.e+-]+)")


def adamw_norms(text: str, start: str) -> tuple[float, float]:
    """The AdamW fingerprint printed on the first line that starts with `start`."""
    line = next(line for line in text.splitlines() if line.startswith(start) and ADAMW_NORMS.search(line))
    return tuple(float(v) for v in ADAMW_NORMS.search(line).groups())


def samples_read(output: Path, steps: range) -> list[str]:
    """Keys of the samples every rank read in the optimizer steps `steps` (from log.sample_ids)."""
    keys = []
    for path in sorted((output / "samples").glob("rank*.txt")):
        for line in path.read_text().splitlines():
            step, *batch = line.split()
            if int(step) in steps:
                keys += batch
    return keys


@pytest.mark.parametrize("stage, precision, new_rank_counts",
                         [(1, "fp32", (1, 3)), (0, "autocast_bf16", (3,)), (2, "bf16", (1,)), (3, "fp32", (3,))],
                         ids=["zero1", "zero0-autocast", "zero2-bf16", "zero3"])
def test_a_run_resumes_on_another_rank_count(shards, tmp_path, stage, precision, new_rank_counts):
    """2 ranks stop mid-epoch; the run goes on with fewer or more: AdamW's state comes back unchanged, and the
    interrupted epoch's samples are read exactly once over the two runs."""
    common = ("--log-every", "1", "--set", f"runtime.zero_stage={stage}", "--set", f"runtime.precision={precision}",
              "--set", "optim.local_batch_size=4", "--set", "log.sample_ids=true")
    first = tmp_path / "two_ranks"
    out = run(shards, first, "--max-steps", "6", *common)  # 4 steps an epoch: stops in epoch 1 after 2 of them
    saved = adamw_norms(out, "checkpoint ")
    for ranks in new_rank_counts:
        extra = ["--set", "optim.global_batch_size=12"] if ranks == 3 else []
        output = tmp_path / f"{ranks}_ranks"
        shutil.copytree(first, output)
        out = run(shards, output, "--max-steps", "10", "--resume", *common, *extra, ranks=ranks)
        assert f"resumed from step00000006 on {ranks} rank{'s' if ranks > 1 else ''} instead of 2" in out
        partitioned = stage > 0 or precision == "bf16"  # the bf16 optimizer shards its master copies too
        assert ("through DeepSpeed's universal checkpoint" in out) == partitioned
        assert adamw_norms(out, "resumed from") == pytest.approx(saved, rel=1e-6)
        if extra:
            assert "optim.global_batch_size: 16 -> 12" in out and (output / "config.step00000006.json").is_file()
        # Epoch 1 is steps 5-8 wherever it was read: 32 samples before the stop, the rest after.
        epoch_one = samples_read(output, range(5, 9))
        assert len(epoch_one) == len(set(epoch_one))
        assert 64 - len(epoch_one) < ranks * (4 + 1)  # only what could not fill a batch on every rank
        records = metrics(output)
        assert [r["step"] for r in records][-4:] == [7, 8, 9, 10] and records[-1]["epoch"] == 2
        assert export_main([str(output), "--to", str(tmp_path / f"{ranks}.pth")]) == 0


def test_milestones_and_going_back_to_a_checkpoint_with_other_masks_and_lr(shards, tmp_path):
    output = tmp_path / "run"
    run(shards, output, "--max-steps", "10", "--log-every", "2", "--set", "checkpoint.milestone_every_epochs=1",
        "--set", "checkpoint.keep_last=1", "--set", "checkpoint.every_steps=3")
    # 4 steps an epoch: milestones at steps 4 and 8 stay; of the rolling ones (3, 6, 9, 10) only the newest.
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000004", "step00000008", "step00000010"]
    out = run(shards, output, "--max-steps", "6", "--log-every", "1", "--resume", "step00000004",
              "--set", "runtime.mask_seed=1", "--set", "optim.lr=0.001")
    assert "going back to step00000004: newer checkpoints moved to" in out
    assert sorted(p.name for p in (checkpoints / "abandoned").iterdir()) == ["step00000008", "step00000010"]
    assert "runtime.mask_seed: 0 -> 1" in out and "optim.lr: 0.002 -> 0.001" in out
    assert "resumed from step00000004 on 2 ranks: step 4, epoch 1" in out
    assert metrics(output)[-2]["lr"] == pytest.approx(lr_at(4 / 4, 0.001, load_config("configs/tiny.toml").optim))
    assert (checkpoints / "latest").read_text() == "step00000006"
    out = run(shards, output, "--max-steps", "8", "--resume", "--set", "runtime.seed=5", expect=2)
    assert "--resume cannot change runtime.seed (0 -> 5)" in out
    assert export_main([str(output), "--to", str(tmp_path / "m.pth"), "--tag", "step00000004"]) == 0
    assert export_main([str(output), "--to", str(tmp_path / "m.pth"), "--tag", "step00000005"]) == 2


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What srun's variables become in a task: every rank its own process, one per node here."""
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")


def test_two_nodes_by_torchrun_then_by_srun_variables_then_stopped_by_a_signal(shards, tmp_path):
    output = tmp_path / "two_nodes"
    args = ["train/pretrain.py", "--config", "configs/tiny.toml", "--data", str(shards), "--output", str(output),
            "--log-every", "1"]
    port = free_port()
    nodes = [start_job([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                        "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                        *args, "--max-steps", "4"], cwd=REPO) for n in (0, 1)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert (output / "checkpoints" / "latest").read_text() == "step00000004"
    # The same job continued with each rank started directly, as srun does, then preempted.
    port = free_port()
    ranks = [start_job([sys.executable, *args, "--max-steps", "100000", "--resume"], cwd=REPO,
                       env=rank_env(r, 2, port)) for r in (0, 1)]
    deadline = time.monotonic() + 300
    while len(metrics(output)) < 7:
        assert all(p.poll() is None for p in ranks) and time.monotonic() < deadline
        time.sleep(0.2)
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [3, 3], outs[0][-3000:]  # stopped: a scheduler requeues on this
    assert "resumed from step00000004 on 2 ranks: step 4, epoch 0" in outs[0], outs[0][-6000:]
    assert "stopped by SIGTERM" in outs[0]
    stopped_at = int((output / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert stopped_at >= 7 and [r["step"] for r in metrics(output)] == list(range(1, stopped_at + 1))


def test_an_output_folder_the_ranks_do_not_share_stops_the_run(tmp_path):
    script = Path(__file__).parent / "scripts" / "shared_folder_check.py"
    env = {"PYTHONPATH": str(REPO)}
    for folders, expect in (([tmp_path / "shared"] * 2, 0), ([tmp_path / "node0", tmp_path / "node1"], 2)):
        port = free_port()
        ranks = [start_job([sys.executable, str(script), str(folder)], env={**rank_env(r, 2, port), **env})
                 for r, folder in enumerate(folders)]
        outs = [p.communicate(timeout=120)[0] for p in ranks]
        assert [p.returncode for p in ranks] == [expect, expect], outs
        if expect:
            assert all("is not shared by all ranks" in out and "every node mounts" in out for out in outs)


def test_sigterm_finishes_the_step_checkpoints_and_exits_cleanly(shards, tmp_path):
    output = tmp_path / "preempted"
    proc = launch(shards, output, "--max-steps", "100000", "--log-every", "1")
    deadline = time.monotonic() + 300
    while not ((output / "metrics.jsonl").is_file() and len(metrics(output)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or Ctrl-C does: every process of the job
    out, _ = proc.communicate(timeout=300)
    assert "stopped by SIGTERM" in out, out[-4000:]
    tag = (output / "checkpoints" / "latest").read_text()
    step = json.loads((output / "checkpoints" / tag / "train_state.json").read_text())["step"]
    assert step >= 3 and metrics(output)[-1]["step"] == step
    assert (output / "viz" / f"reconstruction_step{step:08d}.png").is_file()  # the normal ending ran
    out = run(shards, output, "--max-steps", str(step + 2), "--resume", "--log-every", "1")
    assert f"resumed from {tag}" in out and metrics(output)[-1]["step"] == step + 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    output = tmp_path / "diverged"
    out = run(shards, output, "--max-steps", "20", "--log-every", "10", "--set", "optim.lr=1e30",
              "--set", "optim.warmup_epochs=0", "--set", "checkpoint.every_steps=1", expect=1)
    assert "non-finite loss at step 2: stopping. The last good checkpoint (step00000001) is left intact" in out
    assert (output / "checkpoints" / "latest").read_text() == "step00000001"
    assert not (output / "checkpoints" / "step00000002").exists()


def test_config_errors_are_one_line_before_any_work(shards, tmp_path, capsys):
    cases = [
        (["--set", "optim.bogus=1"], "unknown config key 'optim.bogus'"),
        (["--set", "optim.blr=fast"], "optim.blr: expected float, got 'fast'"),
        (["--set", "runtime.zero_stage=5"], "runtime.zero_stage must be one of 0, 1, 2, 3, got '5'"),
        (["--set", "data.backend=opencv"], "data.backend must be one of dali, pil, got 'opencv'"),
        (["--set", "model.name=vit_giant"], "model.name 'vit_giant' is not one of"),
        (["--config", "configs/nope.toml"], "config preset configs/nope.toml not found"),
        (["--set", "model.init=/nope.pth"], "model.init /nope.pth: no such file"),
        (["--data", str(tmp_path / "none")], "shard folder"),
        (["--output", str(tmp_path / "old")], "already holds a run (checkpoint step00000007): pass --resume"),
    ]
    (tmp_path / "old" / "checkpoints" / "step00000007").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "latest").write_text("step00000007")
    for extra, message in cases:
        argv = ["--config", "configs/tiny.toml", "--data", str(shards), "--output", str(tmp_path / "x"), *extra]
        assert pretrain_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_presets_follow_the_paper_recipe():
    for name, model in (("vit_h14_1600ep", "mae_vit_huge_patch14"), ("vit_l16_1600ep", "mae_vit_large_patch16"),
                        ("vit_b16_1600ep", "mae_vit_base_patch16")):
        cfg = load_config(REPO / "configs" / f"{name}.toml")
        assert cfg.model.name == model and cfg.model.norm_pix_loss and cfg.model.mask_ratio == 0.75
        o = cfg.optim
        recipe = (o.global_batch_size, o.blr, o.betas, o.weight_decay, o.warmup_epochs, o.epochs, o.gradient_clipping)
        assert recipe == (4096, 1.5e-4, (0.9, 0.95), 0.05, 40, 1600, 0.0)
        assert cfg.runtime.precision == "autocast_bf16" and cfg.runtime.zero_stage == 0
        # Runs as shipped on any power-of-two allocation up to 4096 GPUs, within its memory limit.
        for ranks in (1, 8, 64, 512):
            plan = plan_batch(o, ranks)
            assert plan.global_batch_size == 4096 and plan.local_batch_size <= o.max_local_batch_size


def test_batch_plan_derives_the_missing_number():
    assert plan_batch(OptimConfig(global_batch_size=4096), 64).local_batch_size == 64
    plan = plan_batch(OptimConfig(global_batch_size=4096, local_batch_size=32), 64)
    assert (plan.grad_accum_steps, plan.global_batch_size) == (2, 4096)
    assert plan_batch(OptimConfig(global_batch_size=4096, grad_accum_steps=4), 8).local_batch_size == 128
    with pytest.raises(ConfigError, match="does not split evenly over 3 ranks"):
        plan_batch(OptimConfig(global_batch_size=4096), 3)
    with pytest.raises(ConfigError, match="!= local_batch_size 8 x grad_accum_steps 2 x 4 ranks"):
        plan_batch(OptimConfig(global_batch_size=100, local_batch_size=8, grad_accum_steps=2), 4)
    # A memory limit: the fewest accumulation steps that keep the local batch within it.
    limited = OptimConfig(global_batch_size=4096, max_local_batch_size=128)
    assert [(p.local_batch_size, p.grad_accum_steps) for p in (plan_batch(limited, w) for w in (1, 8, 64))] == [
        (128, 32), (128, 4), (64, 1)]
    assert plan_batch(OptimConfig(global_batch_size=96, max_local_batch_size=40), 1).local_batch_size == 32


def test_learning_rate_schedule():
    cfg = TrainConfig().optim
    peak = 1.5e-4 * 4096 / 256
    assert lr_at(0, peak, cfg) == 0 and lr_at(20, peak, cfg) == pytest.approx(peak / 2)
    assert lr_at(40, peak, cfg) == pytest.approx(peak)
    assert lr_at(820, peak, cfg) == pytest.approx(peak / 2)
    assert lr_at(1600, peak, cfg) == pytest.approx(0, abs=1e-12)


def test_the_optimizer_decays_weights_but_not_biases_and_norms():
    """The recipe's groups, on the optimizer the trainer builds (the one DeepSpeed then wraps)."""
    cfg = load_config("configs/tiny.toml")
    model = tiny_preset_model()
    optimizer = build_optimizer(model, cfg.optim, 1e-3)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(decay_of) == len(trained)  # every trained parameter once, the frozen position embeddings not at all
    for name, param in trained.items():
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        assert decay_of[id(param)] == (0.0 if no_decay else cfg.optim.weight_decay), name
    assert decay_of[id(model.blocks[0].norm1.weight)] == 0.0 and decay_of[id(model.blocks[0].attn.qkv.bias)] == 0.0
    assert decay_of[id(model.blocks[0].attn.qkv.weight)] == cfg.optim.weight_decay
    assert decay_of[id(model.cls_token)] == cfg.optim.weight_decay  # [1, 1, D]: decayed, as in the reference


def test_a_users_deepspeed_json_is_merged_and_may_not_contradict_the_config(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7, "overlap_comm": True},
                                "comms_logger": {"enabled": True}}))
    cfg = load_config("configs/tiny.toml", [f"runtime.deepspeed_config={user}", "runtime.zero_stage=2"])
    merged = deepspeed_config(cfg, plan_batch(cfg.optim, 2))
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5e7, "overlap_comm": True}
    assert merged["comms_logger"] == {"enabled": True} and merged["train_batch_size"] == 16
    for clash, message in (({"train_batch_size": 32}, "set optim.global_batch_size instead"),
                           ({"zero_optimization": {"stage": 3}}, "set runtime.zero_stage"),
                           ({"optimizer": {"type": "Adam"}}, "maeflow builds a fused torch AdamW")):
        user.write_text(json.dumps(clash))
        with pytest.raises(ConfigError, match=message):
            deepspeed_config(cfg, plan_batch(cfg.optim, 2))


def test_print_config_plans_the_batch_for_a_rank_count_and_checks_the_data(shards, tmp_path, capsys):
    assert pretrain_main(["--config", "configs/vit_h14_1600ep.toml", "--data", str(shards), "--print-config",
                          "--ranks", "8"]) == 0
    out = capsys.readouterr().out
    assert "batch on 8 ranks: 4096 = 128 local x 4 accumulation x 8 ranks" in out
    assert "peak lr: 0.0024" in out and "data: 64 training samples" in out and '"stage": 0' in out
    assert pretrain_main(["--config", "configs/vit_h14_1600ep.toml", "--data", str(tmp_path / "nowhere"),
                          "--print-config"]) == 2
    assert "shard folder" in capsys.readouterr().err


def test_compiled_blocks_keep_names_and_results():
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tiny_preset_model()
        if compiled:
            compile_blocks(model)
        loss, _, _ = model(imgs, noise=noise)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad},
                        list(model.state_dict())))
    assert results[0][2] == results[1][2]  # checkpoints and exports see the same parameter names
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
