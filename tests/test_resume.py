"""Resume decisions and the run folder's rules, on real files without training: what --resume checks
before it writes, how a branch is set aside, the folder lock."""

import json
import subprocess
import sys
import time

import pytest
import torch

from pipeline.build_shards import main as build_shards
from pipeline.loader_state import LoaderState, ReadPosition
from tests.helpers import REPO, mark_checkpoint
from train.checkpoint import ResumeError, TrainState, resume_tag
from train.config import ConfigError, builtin_task, load_config
from train.mae_task import MaeTask
from train.resume import FIXED_ON_RESUME, ResumePlan, config_changes, plan_resume
from train.run_folder import FolderInUse, existing_run, keep_config, lock_folder, set_aside_branch


def fake_checkpoint(output, step: int, loader_state: LoaderState | None = None) -> str:
    """A complete checkpoint as far as the resume plan reads one: train state and rank 0's loader
    state."""
    tag = f"step{step:08d}"
    folder = output / "checkpoints" / tag
    folder.mkdir(parents=True)
    loader = loader_state.to_dict() if loader_state else {}
    torch.save({"loader": loader, "noise_rng": None}, folder / "rank00000.pt")
    mark_checkpoint(folder, step, world_size=2)
    return tag


def logged_run(output, steps: list[int]) -> None:
    (output / "viz").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps]
    (output / "metrics.jsonl").write_text("".join(lines))
    (output / "viz" / "losses.jsonl").write_text("".join(lines))
    for s in steps:
        (output / "viz" / f"reconstruction_step{s:08d}.png").write_bytes(b"png")
    (output / "samples").mkdir(exist_ok=True)
    for rank in range(2):  # log.sample_ids: a line per local batch, the last one cut by the crash
        batches = "".join(f"{s} {rank}-{s}-a {rank}-{s}-b\n" for s in steps)
        (output / "samples" / f"rank{rank:05d}.txt").write_text(
            batches + f"{steps[-1] + 1} {rank}-cu"
        )


def test_resume_takes_latest_a_tag_or_a_bare_step_number(tmp_path):
    for step in (4, 8, 1200):
        fake_checkpoint(tmp_path, step)
    ckpt = tmp_path / "checkpoints"
    assert resume_tag(ckpt, "latest") == "step00001200"
    assert resume_tag(ckpt, "1200") == "step00001200" and resume_tag(ckpt, "8") == "step00000008"
    assert resume_tag(ckpt, "step00000004") == "step00000004"
    with pytest.raises(
        ResumeError, match="holds no complete checkpoint step00000005; complete ones: step00000004"
    ):
        resume_tag(ckpt, "5")


def test_going_back_sets_the_newer_branch_aside_and_points_latest_at_the_tag(tmp_path):
    for step in (4, 8, 10):
        fake_checkpoint(tmp_path, step)
    logged_run(tmp_path, [2, 4, 6, 8, 10])
    plan = ResumePlan(tmp_path, "step00000004", TrainState(4, 1, 64, 2), (), False, False,
                      ("step00000008", "step00000010"))
    plan.apply()
    # A crash right now, before the first new checkpoint, must resume from the tag gone back to.
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000004"
    assert resume_tag(tmp_path / "checkpoints", "latest") == "step00000004"
    (branch,) = (tmp_path / "abandoned").iterdir()
    assert sorted(p.name for p in (branch / "checkpoints").iterdir()) == [
        "step00000008",
        "step00000010",
    ]
    assert [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ] == [2, 4]
    assert [
        json.loads(line)["step"] for line in (branch / "metrics.jsonl").read_text().splitlines()
    ] == [6, 8, 10]
    assert [
        json.loads(line)["step"]
        for line in (branch / "viz" / "losses.jsonl").read_text().splitlines()
    ] == [6, 8, 10]
    assert sorted(p.name for p in (tmp_path / "viz").glob("*.png")) == [
        "reconstruction_step00000002.png",
        "reconstruction_step00000004.png",
    ]
    # The samples each rank read: the resumed steps read theirs again, so the run's log holds each
    # step once.
    for rank in range(2):
        name = f"samples/rank{rank:05d}.txt"
        assert [line.split()[0] for line in (tmp_path / name).read_text().splitlines()] == [
            "2",
            "4",
        ]
        assert [line.split()[0] for line in (branch / name).read_text().splitlines()] == [
            "6",
            "8",
            "10",
        ]
    # The same step gone back to again: a second branch beside the first, nothing overwritten.
    fake_checkpoint(tmp_path, 6)
    logged_run(tmp_path, [2, 4, 5, 6])
    set_aside_branch(tmp_path, 4, ["step00000006"])
    assert len(list((tmp_path / "abandoned").iterdir())) == 2
    assert set_aside_branch(tmp_path, 4, []) is None  # nothing after step 4 is left


def test_a_kept_config_is_never_overwritten(tmp_path):
    for text in ("first", "second", "third"):
        (tmp_path / "config.json").write_text(text)
        keep_config(tmp_path, 4)
    assert [
        (tmp_path / name).read_text()
        for name in (
            "config.step00000004.json",
            "config.step00000004.2.json",
            "config.step00000004.3.json",
        )
    ] == ["first", "second", "third"]


def test_a_folder_holds_a_run_once_it_has_a_config_metrics_or_a_checkpoint(tmp_path):
    assert existing_run(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text("")
    assert existing_run(tmp_path) == "metrics.jsonl"
    fake_checkpoint(tmp_path, 3)
    assert existing_run(tmp_path) == "checkpoint step00000003"


def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_free(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from train.run_folder import lock_folder; lock = lock_folder(Path(sys.argv[1])); "
            "print('locked', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            FolderInUse, match=f"in use by a live run \\(host .* pid {holder.pid} since"
        ):
            lock_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # the killed run's lock went with it: a requeued job is never refused
    lock = lock_folder(tmp_path)
    assert str(time.localtime().tm_year) in (tmp_path / ".lock").read_text()
    lock.close()


def test_a_resume_that_would_change_the_model_or_the_data_order_is_refused():
    saved = load_config(REPO / "configs" / "tiny.toml")
    assert config_changes(saved, load_config(REPO / "configs" / "tiny.toml", ["optim.lr=0.1"])) == [
        "optim.lr: 0.002 -> 0.1"]
    for preset, key, value in (
        ("tiny", "runtime.seed", "5"),
        ("tiny", "model.name", "mae_vit_base_patch16"),
        ("tiny", "data.img_size", "128"),
        ("tiny", "optim.optimizer", "lars"),
        ("finetune_tiny", "finetune.mode", "linear_probe"),
        ("finetune_tiny", "finetune.num_classes", "10"),
    ):
        saved = load_config(REPO / "configs" / f"{preset}.toml")
        # those every task keeps, and its own
        fixed = FIXED_ON_RESUME + builtin_task(saved.TASK).fixed_on_resume
        with pytest.raises(ConfigError, match=f"--resume cannot change {key}"):
            config_changes(
                saved, load_config(REPO / "configs" / f"{preset}.toml", [f"{key}={value}"]), fixed
            )


def test_a_resume_onto_resharded_data_is_refused_before_anything_is_written(shards, tmp_path):
    """The same images built into other shards: the checkpoint's position means nothing there, and
    the refusal must leave the run's config and checkpoints as they were (the next correct --resume
    needs them)."""
    from pipeline import build_loader

    cfg = load_config(
        REPO / "configs" / "tiny.toml", [f"data.shards={shards}", f"output={tmp_path / 'run'}"]
    )
    loader = build_loader(
        shards, local_batch_size=8, img_size=16, device="cpu", backend="pil", num_threads=1
    )
    output = tmp_path / "run"
    fake_checkpoint(output, 6, loader.state_dict())
    (output / "config.json").write_text(cfg.to_json())
    assert plan_resume(output, "step00000006", cfg, 2, MaeTask).tag == "step00000006"
    images = shards.parent / "images" / "train"
    assert (
        build_shards(
            [
                str(images),
                str(tmp_path / "resharded"),
                "--shard-size-mb",
                "0.2",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    moved = load_config(REPO / "configs" / "tiny.toml", [f"data.shards={tmp_path / 'resharded'}",
                                                        f"output={output}"])
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    with pytest.raises(
        ResumeError,
        match=r"--resume from .*step00000006 with --data .*resharded: loader state was "
        r"taken on 64 samples in 3 shards, these shards hold 64 in \d+",
    ):
        plan_resume(output, "step00000006", moved, 2, MaeTask)
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
    # The same images in shards of the same sizes, another order (another --seed): a position there
    # would read other samples, some twice and some never.
    for seed in (0, 7):
        assert (
            build_shards(
                [
                    str(images),
                    str(tmp_path / f"seed{seed}"),
                    "--shard-size-mb",
                    "100",
                    "--workers",
                    "1",
                    "--quiet",
                    "--seed",
                    str(seed),
                ]
            )
            == 0
        )
    first = build_loader(
        tmp_path / "seed0",
        local_batch_size=8,
        img_size=16,
        device="cpu",
        backend="pil",
        num_threads=1,
    )
    other = tmp_path / "other_order"
    fake_checkpoint(other, 6, first.state_dict())
    (other / "config.json").write_text(cfg.to_json())
    for seed, refused in ((0, False), (7, True)):
        data = load_config(
            REPO / "configs" / "tiny.toml",
            [f"data.shards={tmp_path / f'seed{seed}'}", f"output={other}"],
        )
        if not refused:
            assert plan_resume(other, "step00000006", data, 2, MaeTask).tag == "step00000006"
            continue
        with pytest.raises(
            ResumeError,
            match="loader state was taken on other shards than these, with the same sizes",
        ):
            plan_resume(other, "step00000006", data, 2, MaeTask)


def test_a_position_mid_epoch_under_another_sample_order_is_refused_one_at_an_epoch_start_is_not(
        shards, tmp_path):
    """A loader state keeps the sample-order rule its position was taken under (`ORDER_RULE`): the
    rest of an epoch started under another would repeat and skip samples, so only a position at an
    epoch's start resumes there."""
    from dataclasses import replace

    from pipeline import build_loader
    from pipeline.loader_state import ORDER_RULE

    loader = build_loader(
        shards, local_batch_size=8, img_size=16, device="cpu", backend="pil", num_threads=1
    )
    loader.set_epoch(3)
    next(iter(loader))
    state = loader.state_dict()
    other_rule = replace(state, data=replace(state.data, order_rule=ORDER_RULE - 1))
    output = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "tiny.toml", [f"data.shards={shards}", f"output={output}"])
    fake_checkpoint(output, 6, other_rule)
    (output / "config.json").write_text(cfg.to_json())
    with pytest.raises(
        ResumeError,
        match=rf"loader state was taken 1 batches into epoch 3 under sample-order rule "
        rf"{ORDER_RULE - 1}, and this maeflow orders an epoch's samples by rule "
        rf"{ORDER_RULE}",
    ):
        plan_resume(output, "step00000006", cfg, 2, MaeTask)
    # at an epoch's start: nothing was read
    loader.load_state_dict(replace(other_rule, position=ReadPosition(3)))
    assert loader.position == ReadPosition(3)
    # this rule's own states resume mid-epoch
    loader.load_state_dict(replace(state, position=ReadPosition(3, 1)))
    assert loader.position == ReadPosition(3, 1)


def test_a_loader_state_of_another_data_seed_or_other_shards_is_refused(shards):
    """A position means something only in the data set and sample order it was taken in: another
    data seed, other shard sizes, or other shards of the same sizes are each refused, by name."""
    from dataclasses import replace

    from pipeline import build_loader

    loader = build_loader(
        shards, local_batch_size=8, img_size=16, device="cpu", backend="pil", num_threads=1
    )
    loader.set_epoch(1)
    next(iter(loader))
    state = loader.state_dict()
    for changed, message in [
        ({"seed": state.data.seed + 1}, rf"loader state is for data seed {state.data.seed + 1}"),
        ({"samples": state.data.samples + 1}, "loader state was taken on .* samples in"),
        ({"identity": "another"}, "loader state was taken on other shards than these"),
    ]:
        with pytest.raises(ValueError, match=message):
            loader.load_state_dict(replace(state, data=replace(state.data, **changed)))
    loader.load_state_dict(state)
    assert loader.position == state.position


def test_a_position_moves_to_new_ranks_when_the_rank_count_or_the_local_batch_changes():
    """Taken 3 batches of 8 into epoch 2 on 2 ranks: the same ranks and batch go on there; another
    rank count or another local batch on the same ranks starts after that segment, handed over."""
    from pipeline.loader_state import DataSet, LoaderState, Segment

    position = ReadPosition(2, 3)
    state = LoaderState(position, DataSet.of([10, 20], 0, "shards"), 0, 2, 8, "dali")
    assert state.position_on(2, 8) == position
    handed = ReadPosition(2, 0, (Segment(2, 8, 3),))
    assert state.position_on(4, 8) == handed
    assert state.position_on(2, 4) == handed


def test_a_checkpoint_whose_save_was_killed_is_never_counted_and_is_pruned(tmp_path):
    from train.checkpoint import latest_tag, prune_checkpoints

    fake_checkpoint(tmp_path, 4)
    killed = tmp_path / "checkpoints" / "step00000008"  # every file but the one written last
    killed.mkdir()
    torch.save({"loader": {}, "noise_rng": None}, killed / "rank00000.pt")
    (killed / "mp_rank_00_model_states.pt").write_bytes(b"half")
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(
        ResumeError, match="holds no complete checkpoint step00000008; complete ones: step00000004"
    ):
        resume_tag(ckpt, "8")
    assert resume_tag(ckpt, "latest") == latest_tag(ckpt) == "step00000004"
    assert existing_run(tmp_path) == "checkpoint step00000004"
    fake_checkpoint(tmp_path, 12)  # the next save that completes
    prune_checkpoints(ckpt, keep_last=3, newest="step00000012")
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000004", "step00000012"]
