"""Real fine-tuning runs, launched as a user launches them: from a pre-trained tiny run against
random weights, resumed mid-epoch on the same and on another rank count, and refused on inputs that
do not fit."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from model.weights import load_weights_file
from tests.helpers import REPO
from tests.runs import events, make_sample_shards, metrics, records, run
from train.config import load_config
from train.export import consolidated_state_dict
from train.export import main as export_main
from train.recipe import lr_at

pytestmark = pytest.mark.slow

CLASSES = 8
FINETUNE = {"script": "train/finetune.py", "config": "configs/finetune_tiny.toml"}
STEPS_PER_EPOCH = 12  # 192 train images, a global batch of 16


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Sample shards of 8 classes (192 train, 96 val images) and a tiny MAE pre-trained on them for
    400 steps (36 s on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("finetune")
    shards = make_sample_shards(root, classes=CLASSES, train_per_class=24, val_per_class=12)
    run(
        shards,
        root / "pretrained",
        "--max-steps",
        "400",
        "--set",
        "eval.every_epochs=0",
        "--set",
        "log.viz_every=100",
    )
    return shards, root / "pretrained"


BUDGET = ("--set", "optim.epochs=3")  # 36 steps


@pytest.fixture(scope="module")
def finetuned(pretrained):
    """3 epochs of fine-tuning from the pre-trained encoder: the run under test, and the unbroken
    reference the resume test compares with."""
    shards, encoder = pretrained
    output = encoder.parent / "finetuned"
    run(shards, output, *BUDGET, "--set", f"model.init={encoder}", **FINETUNE)
    return output


def evaluations(output):
    return [r for r in records(output) if "top1" in r]


def test_fine_tuning_a_pretrained_encoder_learns_the_classes(pretrained, finetuned):
    """That fine-tuning starts from the pre-trained encoder is pinned exactly (test_trainer); here,
    that it learns. (A comparison with random weights on this toy is a matter of luck: 67-73%
    against 47-65% over seeds.)"""
    ours = evaluations(finetuned)
    # each image once
    assert [r["epoch"] for r in ours] == [1, 2, 3] and all(r["val_samples"] == 96 for r in ours)
    best = max(r["top1"] for r in ours)
    chance = 1 / CLASSES
    assert best >= 4 * chance, ours
    saved = load_weights_file(finetuned / "best.pth")
    assert saved["maeflow"]["top1"] == best and saved["model"]["head.weight"].shape == (
        CLASSES,
        192,
    )
    # The lr of every logged step is the schedule's, counted in epochs of 12 steps; every
    # layer-decay group trained the last step at that lr times its scale.
    optim = load_config("configs/finetune_tiny.toml", ["optim.epochs=3"]).optim
    for record in metrics(finetuned):
        assert record["lr"] == pytest.approx(
            lr_at((record["step"] - 1) / STEPS_PER_EPOCH, optim.lr, optim)
        )
    saved = torch.load(finetuned / "checkpoints" / "step00000036" / "mp_rank_00_model_states.pt",
                       # DeepSpeed's own file: it holds more than tensors
                       map_location="cpu", weights_only=False)
    last_lr = lr_at(35 / STEPS_PER_EPOCH, optim.lr, optim)
    groups = saved["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx(
        [0.75**k for k in range(5, -1, -1)]
    )
    assert all(g["lr"] == pytest.approx(last_lr * g["lr_scale"]) for g in groups)


def test_a_compiled_and_recomputed_fine_tuning_run_gives_the_eager_losses(
    pretrained, finetuned, tmp_path
):
    shards, encoder = pretrained
    output = tmp_path / "compiled"
    run(shards, output, *BUDGET, "--set", f"model.init={encoder}", "--max-steps", "10",
        "--set", "runtime.compile=true", "--set", "model.activation_recompute=true", **FINETUNE)
    eager = {r["step"]: r["loss"] for r in metrics(finetuned)}
    compiled = {r["step"]: r["loss"] for r in metrics(output)}
    assert sorted(compiled) == [5, 10]
    assert compiled == pytest.approx({step: eager[step] for step in compiled}, rel=1e-5)
    # the evaluation at the end ran through the compiled blocks too
    assert len(evaluations(output)) == 1


def test_an_evaluation_only_run_of_best_pth_gives_the_runs_own_figures(
    pretrained, finetuned, tmp_path
):
    """The reference's --eval --resume: one command, no launcher needed (a plain `python` is one
    rank), nothing written; the figures of the run's evaluation whose weights best.pth kept."""
    shards, _ = pretrained
    command = [
        sys.executable,
        "train/finetune.py",
        "--config",
        "configs/finetune_tiny.toml",
        "--data",
        str(shards),
        "--output",
        str(tmp_path / "unused"),
        "--eval",
        str(finetuned / "best.pth"),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    best = max(evaluations(finetuned), key=lambda r: r["top1"])
    assert (result["top1"], result["top5"], result["val_samples"]) == (
        best["top1"],
        best["top5"],
        96,
    )
    assert result["val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    assert not (tmp_path / "unused").exists()


def test_the_linear_probe_trains_its_head_on_the_frozen_encoder(pretrained, tmp_path):
    shards, encoder = pretrained
    run(
        shards,
        tmp_path / "probe",
        "--set",
        f"model.init={encoder}",
        "--set",
        "finetune.mode=linear_probe",
        "--set",
        "optim.optimizer=lars",
        "--set",
        "optim.lr=20",
        "--set",
        "optim.weight_decay=0",
        "--set",
        "optim.epochs=3",
        **FINETUNE,
    )
    best = max(r["top1"] for r in evaluations(tmp_path / "probe"))
    assert best >= 2 / CLASSES  # 35% measured: LARS moves the head slowly, and 36 steps are few
    probed = load_weights_file(tmp_path / "probe" / "best.pth")["model"]
    start = consolidated_state_dict(encoder)[0]
    for key in ("patch_embed.proj.weight", "blocks.3.mlp.fc2.weight", "norm.weight", "cls_token"):
        assert torch.equal(probed[key], start[key]), key  # frozen
    # the BatchNorm (no affine) learnt the features' statistics
    assert probed["head.0.running_var"].ne(1).all()
    assert "head.0.weight" not in probed


def test_a_fine_tuning_run_resumes_mid_epoch_exactly_and_on_another_rank_count(
    pretrained, finetuned, tmp_path
):
    shards, encoder = pretrained
    common = (*BUDGET, "--set", f"model.init={encoder}")
    stopped = tmp_path / "stopped"
    # eight steps into the second epoch
    run(shards, stopped, *common, "--max-steps", "20", **FINETUNE)
    resumed = tmp_path / "resumed"
    shutil.copytree(stopped, resumed)
    run(shards, resumed, *common, "--resume", **FINETUNE)
    whole = {r["step"]: r["loss"] for r in metrics(finetuned)}
    after = {r["step"]: r["loss"] for r in metrics(resumed) if r["step"] > 20}
    assert sorted(after) == [25, 30, 35, 36]
    # same crops, mixes, drops
    assert after == pytest.approx({step: whole[step] for step in after}, rel=1e-5)
    # The best top-1 so far came back with the checkpoint, so best.pth is the best of the whole run.
    (event,) = events(resumed, "resumed")
    assert event["jobs"]["top-1 evaluation"]["best_top1"] == max(
        r["top1"] for r in evaluations(stopped)
    )
    assert load_weights_file(resumed / "best.pth")["maeflow"]["top1"] == max(
        r["top1"] for r in evaluations(resumed)
    )
    one_rank = tmp_path / "one_rank"
    shutil.copytree(stopped, one_rank)
    run(
        shards,
        one_rank,
        *common,
        "--resume",
        "--set",
        "optim.local_batch_size=8",
        ranks=1,
        **FINETUNE,
    )
    (event,) = events(one_rank, "resumed")
    assert (event["world_size"], event["saved_world_size"]) == (1, 2)
    assert metrics(one_rank)[-1]["step"] == 36 and metrics(one_rank)[-1]["epoch"] == 2
    # the last weights, not the best
    assert export_main([str(one_rank), "--to", str(tmp_path / "last.pth")]) == 0
    assert load_weights_file(tmp_path / "last.pth")["model"]["head.weight"].shape == (CLASSES, 192)


def test_a_val_split_of_another_class_list_is_refused_in_one_line(shards, tmp_path):
    """The refusal path of a launched run: one line, exit 2, nothing written (the other refusals are
    checked as functions in test_finetune.py)."""
    mixed = tmp_path / "mixed"
    shutil.copytree(shards, mixed)
    manifest = json.loads((mixed / "val.json").read_text())
    manifest["classes"] = manifest["classes"][::-1]
    (mixed / "val.json").write_text(json.dumps(manifest))
    out = run(mixed, tmp_path / "run", ranks=1, expect=2, **FINETUNE)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert "label different class lists (the same classes in another order)" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
