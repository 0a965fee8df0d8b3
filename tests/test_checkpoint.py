"""Checkpoints that survive a node's crash: every part on the disk before the mark that vouches for
it, the mark before `latest`, pruning after both (counted on a real run's fsyncs and renames), and a
resume that finds a damaged newest checkpoint and takes the newest sound one."""

import json
import os
import shutil
from pathlib import Path

import pytest

from train import pretrain
from train.checkpoint import (
    MARK,
    MILESTONE,
    ResumeError,
    damage,
    prune_checkpoints,
    sound_resume_tag,
)


@pytest.fixture
def one_rank(one_rank, monkeypatch):
    """conftest's, with the model's ops in torch (the kernels have their own tests)."""
    monkeypatch.setenv("MAE_KERNELS", "torch")


def tiny_run(output: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "tiny",
        "--output",
        str(output),
        "--set",
        "data.backend=synthetic",
        "--set",
        "data.synthetic_samples=256",
        "--set",
        "checkpoint.every_steps=2",
        "--set",
        "checkpoint.keep_last=1",
        "--set",
        "eval.every_epochs=0",
        "--set",
        "log.viz_every=100",
        "--set",
        "log.tensorboard=false",
        *extra,
    ]


def test_a_checkpoint_is_on_the_disk_before_its_mark_and_the_mark_before_latest_and_pruning(
    one_rank, tmp_path, monkeypatch
):
    """The real trainer, checkpoints at steps 2, 4 and 6 keeping the last: each file's bytes reach
    the disk (fsync) before its rename, every part the mark lists before the mark is renamed into
    place, the folder after each rename, `latest` after the mark, and the older checkpoint goes only
    after `latest` names the new one."""
    events: list[tuple[str, str]] = []
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recorded_replace(src, dst, *args, **kwargs):
        events.append(("replace", f"{src} -> {dst}"))
        return replace(src, dst, *args, **kwargs)

    def recorded_rmtree(path, *args, **kwargs):
        events.append(("remove", str(path)))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    monkeypatch.setattr(shutil, "rmtree", recorded_rmtree)
    output = tmp_path / "run"
    assert pretrain.main(tiny_run(output, "--max-steps", "6")) == 0
    ckpt = output / "checkpoints"
    step6, step4 = ckpt / "step00000006", str(ckpt / "step00000004")

    def first(kind: str, what: str) -> int:
        return next(i for i, (k, w) in enumerate(events) if k == kind and w == what)

    mark_in_place = first("replace", f"{step6 / MARK}.tmp -> {step6 / MARK}")
    parts = json.loads((step6 / MARK).read_text())["parts"]
    assert {"rank00000.pt", "adamw_norms.json", "mp_rank_00_model_states.pt"} <= set(parts)
    for name in parts:  # DeepSpeed's files are flushed where they lie; ours before their rename
        written = step6 / name
        flushed = [
            i
            for i, (k, w) in enumerate(events)
            if k == "fsync" and w in (str(written), f"{written}.tmp")
        ]
        assert flushed and flushed[0] < mark_in_place, name
    assert (
        first("fsync", f"{step6 / MARK}.tmp")
        < mark_in_place
        < events.index(("fsync", str(step6)), mark_in_place)
    )
    latest = events.index(("replace", f"{ckpt / 'latest'}.tmp -> {ckpt / 'latest'}"), mark_in_place)
    assert latest < events.index(("fsync", str(ckpt)), latest)
    pruned = first("remove", step4)
    assert latest < pruned and not Path(step4).exists()
    assert (ckpt / "latest").read_text() == "step00000006" and damage(ckpt, "step00000006") is None


def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_newest_sound_one(
    one_rank, tmp_path, capsys
):
    output = tmp_path / "run"
    assert (
        pretrain.main(tiny_run(output, "--max-steps", "4", "--set", "checkpoint.keep_last=2")) == 0
    )
    ckpt = output / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000004"
    part = ckpt / "step00000004" / "mp_rank_00_model_states.pt"
    size = part.stat().st_size
    with open(part, "r+b") as f:  # what a crash leaves of a file whose bytes never reached the disk
        f.truncate(size // 3)
    assert (
        damage(ckpt, "step00000004")
        == f"mp_rank_00_model_states.pt is {size // 3} bytes, {size} when written"
    )
    assert damage(ckpt, "step00000002") is None
    capsys.readouterr()

    # the one asked: refused
    assert pretrain.main(tiny_run(output, "--max-steps", "4", "--resume", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step00000004 is damaged: mp_rank_00_model_states.pt is" in err[0], err

    assert pretrain.main(tiny_run(output, "--max-steps", "5", "--resume")) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "is damaged" in line]
    assert line.endswith("resuming from step00000002, the newest sound checkpoint before it"), line
    resumed = [
        json.loads(r)
        for r in (output / "metrics.jsonl").read_text().splitlines()
        if '"resumed"' in r
    ]
    assert resumed[-1]["from"] == "step00000002"
    # nothing is deleted: the damaged branch is set aside
    (aside,) = (output / "abandoned").iterdir()
    assert (aside / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt").is_file()

    # keep_last 1: 2 went after 5
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step00000005"]
    zeroed = ckpt / "step00000005" / "rank00000.pt"
    zeroed.write_bytes(bytes(zeroed.stat().st_size))  # same size, other bytes
    assert damage(ckpt, "step00000005") == "rank00000.pt holds other bytes than were written"
    written = zeroed.stat().st_size
    with open(zeroed, "ab") as f:  # longer than written: a part another run appended to
        f.write(bytes(10))
    longer = f"rank00000.pt is {written + 10} bytes, {written} when written"
    assert damage(ckpt, "step00000005") == longer
    with pytest.raises(
        ResumeError, match=r"step00000005 is damaged: .*; no sound checkpoint to resume from"
    ):
        sound_resume_tag(ckpt, "latest")
    (ckpt / "step00000005" / MARK).write_text('{"step": 5')  # a mark cut short
    assert damage(ckpt, "step00000005").startswith(f"its completion mark {MARK} cannot be read")


def test_pruning_keeps_the_newest_rolling_checkpoints_every_milestone_and_what_is_being_written(
    tmp_path,
):
    """keep_last 2 over steps 1-6 (2 and 4 milestones): 5 and 6 stay with both milestones; a
    checkpoint left incomplete by a killed save (0) goes, one still being written after the newest
    (7) stays."""
    for step in range(8):
        folder = tmp_path / f"step{step:08d}"
        folder.mkdir()
        if 1 <= step <= 6:
            (folder / MARK).write_text("{}")
        if step in (2, 4):
            (folder / MILESTONE).write_text("{}")
    prune_checkpoints(tmp_path, keep_last=2, newest="step00000006")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"step{step:08d}" for step in (2, 4, 5, 6, 7)
    ]
