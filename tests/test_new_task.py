"""A new task is one file and a preset (tests/scripts/distill_task.py and distill_tiny.toml, neither
pre-training nor fine-tuning): the trainer trains, checkpoints and resumes it with no other module
touched, holds its frozen teacher apart (partitioned under ZeRO-3, never trained) and runs its
per-step job once at each due step."""

import importlib.util
import json
import sys

import torch

from tests.helpers import REPO
from train import launch
from train.config import load_config
from train.trainer import Trainer

PRESET = REPO / "tests" / "scripts" / "distill_tiny.toml"


def distill_task() -> type:
    spec = importlib.util.spec_from_file_location(
        "distill_task", REPO / "tests" / "scripts" / "distill_task.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module.DistillTask




def records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_new_task_in_one_file_trains_checkpoints_and_resumes_as_an_unbroken_run(
    one_rank, tmp_path, capsys
):
    task = distill_task()

    def run(output, *extra: str) -> int:
        return launch.main(
            task, ["--config", str(PRESET), "--output", str(tmp_path / output), *extra]
        )

    assert run("whole", "--max-steps", "6") == 0
    assert run("split", "--max-steps", "4", "--set", "checkpoint.every_steps=2") == 0
    # back to step 2: steps 3 and 4 again
    assert run("split", "--max-steps", "6", "--resume", "2") == 0
    whole, split = records(tmp_path / "whole"), records(tmp_path / "split")
    losses = [[r["loss"] for r in rs if "loss" in r] for rs in (whole, split)]
    # bitwise: the same teacher, batches and student
    assert len(losses[0]) == 6 and losses[1] == losses[0]
    jobs = [[(r["step"], r["reports"]) for r in rs if "similarity" in r] for rs in (whole, split)]
    # once per due step; the job's state resumed with it
    assert jobs[0] == jobs[1] == [(2, 1), (4, 2), (6, 3)]
    assert [r["from"] for r in split if r.get("event") == "resumed"] == ["step00000002"]
    weights = torch.load(
        tmp_path / "split" / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
        weights_only=False,
    )["module"]
    # the teacher is not the engine's to train
    assert weights and all(key.startswith("vit.") for key in weights)
    capsys.readouterr()
    assert launch.main(task, ["--config", str(PRESET), "--print-config"]) == 0
    assert (
        "distill.report_every_steps = 2  # optimizer steps between the teacher-student"
        in capsys.readouterr().out
    )
    assert run("split", "--max-steps", "8", "--resume", "--set", "distill.teacher=t.pth") == 2
    assert "--resume cannot change distill.teacher" in capsys.readouterr().err


def test_a_frozen_model_is_partitioned_under_zero3_on_the_device_and_never_trained(
        one_rank, tmp_path, monkeypatch):
    # ZeRO-3 replaces torch's F.linear for the rest of the process ("persists unless manually
    # reset"): a run's process ends with it, this test's does not, so the original comes back.
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    task = distill_task()
    cfg = load_config(PRESET, [f"output={tmp_path / 'run'}", "runtime.zero_stage=3", "max_steps=2",
                               "checkpoint.at_end=false"], task=task)
    with Trainer(cfg, task, None) as trainer:
        teacher = trainer.task.teacher
        # DeepSpeed's engine holds it
        assert hasattr(teacher, "zero_optimization_partition_weights")
        params = list(teacher.module.parameters())
        # partitioned, frozen
        assert params and all(hasattr(p, "ds_id") and not p.requires_grad for p in params)
        before = {name: p.ds_tensor.clone() for name, p in teacher.module.named_parameters()}
        assert trainer.fit() == 0
        assert all(
            torch.equal(before[name], p.ds_tensor) for name, p in teacher.module.named_parameters()
        )
    assert [r["step"] for r in records(tmp_path / "run") if "similarity" in r] == [2]
