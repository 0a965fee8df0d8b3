"""The trainer's wiring, in this process on one rank: what a launched run checks as a whole (it
finishes, it resumes), checked here quantity by quantity, so that a quantity wrong from the start
(the samples seen, a task's augmentation, a rank's mask noise, a job run twice) fails in seconds.
One short launched run checks what needs two ranks; the slow launched runs (test_*_runs.py) keep
the rest."""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from tests.runs import free_port, run
from train.checkpoint import TrainState, read_train_state
from train.classifier_task import ClassifierTask, image_augmentation
from train.config import load_config
from train.distributed import single_process_env
from train.mae_task import MaeTask
from train.outcome import RunEnd
from train.recipe import lr_at
from train.resume import plan_resume
from train.task import MicroBatch
from train.trainer import Trainer


@pytest.fixture(scope="module")
def rank_env():
    """What a launcher tells a single rank; the model's ops in torch (the kernels have their own
    tests, in the interpreter)."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**single_process_env(), "MAE_KERNELS": "torch"}.items():
            env.setenv(name, value)
        yield env


def mae_config(shards, output, *overrides: str):
    """The tiny preset with steps of 2 accumulated batches of 8: a k-NN evaluation at every epoch's
    end and a reconstruction at every second, a checkpoint every 2 steps (all kept), every step
    logged with its samples."""
    return load_config("tiny", [f"data.shards={shards}", f"output={output}", "eval.every_epochs=1",
                                "log.viz_every=2", "log.log_every=1", "checkpoint.every_steps=2",
                                "checkpoint.keep_last=5", "log.sample_ids=true",
                                "optim.local_batch_size=8", "log.tensorboard=false", *overrides])


@contextlib.contextmanager
def opened(cfg, task=MaeTask, resume: str | None = None) -> Iterator[Trainer]:
    """A trainer of `cfg` in this process, on a port of its own, open until the block ends."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASTER_PORT", str(free_port()))
        with Trainer(cfg, task, resume) as trainer:
            yield trainer


def fit(cfg, task=MaeTask, resume: str | None = None) -> Trainer:
    """A whole run in this process; the trainer, closed, for its state."""
    with opened(cfg, task, resume) as trainer:
        assert trainer.fit() == 0
    return trainer


def lines(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def unbroken(rank_env, shards, tmp_path_factory):
    """Two epochs in one go."""
    output = tmp_path_factory.mktemp("unbroken")
    return fit(mae_config(shards, output, "max_steps=8")), output


@pytest.fixture(scope="module")
def resumed(unbroken, shards, tmp_path_factory):
    """The same run continued from its checkpoint at step 2, mid-epoch."""
    _, first = unbroken
    output = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(first, output)
    return fit(mae_config(shards, output, "max_steps=8"), resume="step00000002"), output


def by_step(output, key: str) -> dict[int, object]:
    return {r["step"]: r[key] for r in lines(output) if key in r}


def test_a_resume_restores_the_samples_seen_so_the_schedule_goes_on_where_it_was(
    unbroken, resumed
):
    trainer, output = resumed
    (event,) = [r for r in lines(output) if r.get("event") == "resumed"]
    assert (event["step"], event["from"]) == (2, "step00000002")
    # Each step's lr follows the samples seen before it: 16 a step from 0, across the resume.
    lrs = by_step(output, "lr")
    peak = trainer.peak_lr
    expected = {step: lr_at(trainer.schedule.progress(16 * (step - 1)), peak, trainer.cfg.optim)
                for step in range(1, 9)}
    assert lrs == pytest.approx(expected, rel=1e-12) and lrs == by_step(unbroken[1], "lr")
    assert by_step(output, "samples") == {step: 16 * step for step in range(1, 9)}
    assert (trainer.state.step, trainer.state.epoch, trainer.state.samples) == (8, 2, 128)


def test_a_resumed_run_goes_on_exactly_as_the_unbroken_one(unbroken, resumed):
    """Losses, samples read and every job's records from step 3 on, bitwise: the loader's position,
    the mask noise and the schedule all came back as they were."""
    first, second = unbroken[1], resumed[1]
    assert by_step(second, "loss") == by_step(first, "loss")
    for name in ("samples",):
        assert sorted((second / name).iterdir()) and [
            p.read_text() for p in sorted((second / name).iterdir())
        ] == [p.read_text() for p in sorted((first / name).iterdir())]
    assert by_step(second, "knn_top1_cls") == by_step(first, "knn_top1_cls")


def test_the_state_a_checkpoint_restores_is_the_state_it_was_taken_in(unbroken, shards, tmp_path):
    """Field by field, the run's and this rank's state at step 2 as the resumed trainer holds it
    before its first step, against what the unbroken run held when it wrote that checkpoint; and
    where the resumed run will end."""
    _, first = unbroken
    output = tmp_path / "run"
    shutil.copytree(first, output)
    cfg = mae_config(shards, output, "max_steps=1000")
    with opened(cfg, MaeTask, "step00000002") as trainer:
        # the schedule's end, 40 epochs of 4 steps from step 0, not 2 + 160; a larger --max-steps
        # does not lengthen it
        assert trainer.stop_at == 160
        saved, rank = trainer.checkpointer.load("step00000002", False, 0.0)
        assert isinstance(saved, TrainState)
        assert (trainer.state.step, trainer.state.epoch, trainer.state.samples) == (2, 0, 32)
        assert (saved.step, saved.epoch, saved.samples) == (2, 0, 32)
        # 2 batches of 8 a step
        assert trainer.loader.position.epoch == 0 and trainer.loader.position.batch == 4
        assert trainer.loader.state_dict().to_dict() == rank["loader"]
        assert torch.equal(trainer.task.noise.get_state(), rank["noise_rng"])
        # the jobs ran once at most by then: none of their state is lost
        assert {job.name: job.state_dict() for job in trainer.jobs} == saved.jobs


def test_a_resume_plan_names_the_newer_checkpoints_it_sets_aside_and_a_changed_mask_seed(
    unbroken, shards
):
    """Going back to step 2 of a run that went on to step 8 (reading only): its later checkpoints
    are the branch set aside, and a changed mask seed draws masks afresh (the same seed: the saved
    stream goes on)."""
    _, first = unbroken
    plan = plan_resume(first, "step00000002", mae_config(shards, first, "max_steps=8",
                                                         "runtime.mask_seed=5"), 1, MaeTask)
    assert plan.newer == ("step00000004", "step00000006", "step00000008")
    assert plan.masks_change and any(c.startswith("runtime.mask_seed:") for c in plan.changes)
    same = plan_resume(first, "step00000002", mae_config(shards, first, "max_steps=8"), 1, MaeTask)
    assert not same.masks_change and not same.changes


def test_each_periodic_job_runs_once_per_due_point_the_runs_end_included(unbroken):
    """The k-NN evaluation at each epoch's end, steps 4 and 8, and the reconstruction at every
    second, step 8, where the run's end falls too: each once there."""
    _, output = unbroken
    assert [r["step"] for r in lines(output) if "knn_top1_cls" in r] == [4, 8]
    drawn = (output / "viz" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in drawn] == [8]


def test_each_logged_window_reports_its_speed_and_data_stall_in_its_units(unbroken):
    """Windows of one step on one rank: img/s is the global batch over the step's time, and the data
    stall is the rank's wait for data as a percentage of that time."""
    _, output = unbroken
    logged = [r for r in lines(output) if "loss" in r]
    assert len(logged) == 8
    for r in logged:
        assert r["img_per_s"] * r["step_time_s"] == pytest.approx(16)
        assert r["data_stall_pct"] == pytest.approx(
            100 * r["rank_data_wait_s_max"] / r["step_time_s"]
        )


def test_a_checkpoint_at_an_epochs_last_step_holds_that_epoch_finished(unbroken):
    """Step 4 ends epoch 0 and is due a checkpoint: the epoch's jobs ran and the epoch was counted
    before it was written, so a resume from it neither runs them again nor reads epoch 0 again."""
    _, output = unbroken
    saved = read_train_state(output / "checkpoints", "step00000004")
    assert (saved.step, saved.epoch, saved.samples) == (4, 1, 64)


def test_a_stop_signal_checkpoints_the_step_after_it_and_ends_the_run(rank_env, shards, tmp_path):
    """SIGTERM before the first step: the vote cast at step 1 stops the run after step 2, with a
    checkpoint there, exit status STOPPED, nothing trained after it, and only the jobs that run
    when stopped run."""
    output = tmp_path / "run"
    cfg = mae_config(shards, output, "max_steps=8", "checkpoint.every_steps=0")
    with opened(cfg) as trainer:
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler takes it
        assert trainer.fit() == RunEnd.STOPPED
    assert trainer.state.step == 2
    assert sorted(p.name for p in (output / "checkpoints").glob("step*")) == ["step00000002"]
    assert max(by_step(output, "loss")) == 2
    # in the grace time before the kill: the reconstruction, which is cheap, not the k-NN
    assert not by_step(output, "knn_top1_cls")
    drawn = (output / "viz" / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in drawn] == [2]


def test_an_epoch_leaves_out_the_batches_that_fill_no_whole_step(rank_env, shards, tmp_path):
    """64 samples in local batches of 12, 2 a step: 5 batches an epoch, 2 steps; the fifth batch
    starts no step, and step 3 is epoch 1's first."""
    output = tmp_path / "run"
    trainer = fit(mae_config(shards, output, "max_steps=3", "optim.local_batch_size=12",
                             "optim.global_batch_size=24", "optim.grad_accum_steps=2",
                             "checkpoint.every_steps=0", "checkpoint.at_end=false",
                             "eval.every_epochs=0", "log.viz_every=100"))
    assert by_step(output, "samples") == {1: 24, 2: 48, 3: 72}
    assert by_step(output, "epoch") == {1: 0, 2: 0, 3: 1}
    assert (trainer.loader.position.epoch, trainer.loader.position.batch) == (1, 2)


def test_a_checkpoint_due_by_the_clock_is_taken_once_the_step_after_the_vote(
    rank_env, shards, tmp_path
):
    """A clock that says "due" at every step (every_minutes of 60 us, less than any step takes): the
    vote of step k decides step k + 1, and the vote cast at a checkpoint's step, before it was
    written, is answered by it, so a checkpoint every other step, never two in a row."""
    output = tmp_path / "run"
    fit(mae_config(shards, output, "max_steps=7", "checkpoint.every_steps=0",
                   "checkpoint.every_minutes=0.000001", "checkpoint.at_end=false",
                   "eval.every_epochs=0", "log.viz_every=100"))
    written = sorted(p.name for p in (output / "checkpoints").glob("step*"))
    assert written == ["step00000002", "step00000004", "step00000006"]


def test_every_rank_draws_its_own_masks_and_the_same_ones_again(unbroken):
    """The loss of one batch through the task of rank 0 and of rank 1, each started as its process
    starts (the same global seed): different masks give different losses; rank 1 again gives its
    own loss again (a rank's stream is its own and reproducible)."""
    trainer, _ = unbroken
    model = trainer.task.model
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def first_loss(rank: int) -> float:
        torch.manual_seed(0)
        task = MaeTask(dataclasses.replace(trainer.ctx, rank=rank))
        task.model = model
        with torch.no_grad():
            return task.loss(model, images, None, MicroBatch(0, 0)).item()

    assert first_loss(0) != first_loss(1)
    assert first_loss(1) == first_loss(1)


@pytest.fixture(scope="module")
def finetuning(rank_env, shards, tmp_path_factory):
    """A fine-tuning trainer, open, before its first step: another seed than the default and steps
    of 2 accumulated batches."""
    output = tmp_path_factory.mktemp("ft")
    cfg = load_config("finetune_tiny", [f"data.shards={shards}", f"output={output}", "max_steps=0",
                                        "log.tensorboard=false", "runtime.seed=7",
                                        "optim.grad_accum_steps=2", "eval.every_epochs=0"])
    with opened(cfg, ClassifierTask) as trainer:
        yield trainer


def test_each_task_builds_its_training_loader_with_its_own_augmentation_and_batch(finetuning):
    trainer = finetuning
    cfg, spec = trainer.cfg, trainer.loader.spec
    assert spec.augment == image_augmentation(cfg.finetune)
    assert spec.augment.rand_augment_layers == cfg.finetune.rand_augment_layers > 0
    assert spec.augment.crop_scale == (cfg.finetune.crop_min_scale, 1.0) != (0.2, 1.0)
    assert spec.labels and spec.train
    # 16 a step on one rank, in 2 accumulated batches of 8
    assert spec.local_batch_size == trainer.plan.local_batch_size == 8
    assert spec.window_shards == cfg.data.window_shards
    assert spec.seed == cfg.runtime.seed == 7
    # the probe trains its head on the crop and flip alone
    probe = image_augmentation(dataclasses.replace(cfg.finetune, mode="linear_probe"))
    assert probe.rand_augment_layers == 0 and probe.crop_scale == spec.augment.crop_scale


def test_every_rank_mixes_and_erases_its_batches_with_its_own_draws(finetuning):
    """The fine-tuning loss of one batch through the task of rank 0 and of rank 1: mixing, erasing
    and drop path draw per rank, and again the same for the same rank."""
    trainer = finetuning
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % trainer.task.num_classes

    def first_loss(rank: int) -> float:
        task = ClassifierTask(dataclasses.replace(trainer.ctx, rank=rank))
        trainer.model.set_drop_path_generator(task.drop_path)  # as the task's own model draws
        with torch.no_grad():
            return task.loss(trainer.model, images, labels, MicroBatch(0, 0)).item()

    assert first_loss(0) != first_loss(1)
    assert first_loss(1) == first_loss(1)


def test_without_mixing_the_targets_are_still_smoothed(finetuning):
    """Mixup and CutMix off, label smoothing 0.1: the loss is the smoothed cross-entropy (the linear
    probe's, the plain one)."""
    trainer = finetuning
    cfg = trainer.cfg
    plain = dataclasses.replace(cfg.finetune, mixup_alpha=0.0, cutmix_alpha=0.0, erase_prob=0.0,
                                label_smoothing=0.1)
    task = ClassifierTask(
        dataclasses.replace(trainer.ctx, cfg=dataclasses.replace(cfg, finetune=plain))
    )
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % task.num_classes
    # a confident model's logits (the fresh head's are all near 0, where smoothing changes nothing)
    logits = 4 * torch.randn(8, task.num_classes, generator=torch.Generator().manual_seed(2))
    loss = task.loss(lambda _: logits, images, labels, MicroBatch(0, 0)).item()
    assert loss == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    assert loss != pytest.approx(F.cross_entropy(logits, labels).item())
    # the linear probe: plain labels, whatever the smoothing configured for fine-tuning
    probe = ClassifierTask(dataclasses.replace(trainer.ctx, cfg=dataclasses.replace(
        cfg, finetune=dataclasses.replace(plain, mode="linear_probe"))))
    probed = probe.loss(lambda _: logits, images, labels, MicroBatch(0, 0)).item()
    assert probed == pytest.approx(F.cross_entropy(logits, labels).item())


def test_fine_tuning_trains_each_layer_at_its_decayed_share_of_the_schedules_lr(finetuning):
    """A step of fine-tuning (layer decay 0.75) after 16 samples: every parameter group's lr is the
    schedule's lr there times its layer's scale (the head 1, the embeddings 0.75^(depth + 1))."""
    trainer = finetuning
    cfg, groups, depth = trainer.cfg, trainer.engine.optimizer.param_groups, trainer.model.depth
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8) % trainer.task.num_classes
    trainer.state.samples = 16
    try:  # the first of the step's two batches: its lr set, no update yet
        trainer.micro_step(images, labels, MicroBatch(1, 0))
    finally:
        trainer.state.samples = 0
    expected = lr_at(trainer.schedule.progress(16), trainer.peak_lr, cfg.optim)
    assert trainer.lr == pytest.approx(expected, rel=1e-12) and expected > 0
    assert [g["lr"] for g in groups] == pytest.approx(
        [expected * g["lr_scale"] for g in groups], rel=1e-12
    )
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx(
        [0.75 ** (depth + 1 - layer) for layer in range(depth + 2)]
    )


def test_two_ranks_count_and_time_all_ranks_samples_and_read_disjoint_ones(shards, tmp_path):
    """The one launched run of the fast suite (about 10 s): what needs two ranks. Each step counts
    the samples of both ranks, the logged speed and step time of a window of 2 steps are the global
    batch's and a step's, and the ranks read different samples."""
    output = tmp_path / "two_ranks"
    run(shards, output, "--max-steps", "4", "--log-every", "2", "--set", "log.sample_ids=true",
        "--set", "eval.every_epochs=0", "--set", "log.tensorboard=false")
    assert by_step(output, "samples") == {2: 32, 4: 64}
    speed, step_time = by_step(output, "img_per_s"), by_step(output, "step_time_s")
    # img/s = 2 steps x 16 images / the window's time; a step's time = the window's time / 2
    assert {step: speed[step] * step_time[step] for step in speed} == pytest.approx({2: 16, 4: 16})
    per_rank = [samples_read_by(path) for path in sorted((output / "samples").glob("rank*.txt"))]
    assert len(per_rank) == 2 and all(len(keys) == 32 for keys in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])


def samples_read_by(path) -> list[str]:
    return [key for line in path.read_text().splitlines() for key in line.split()[1:]]
