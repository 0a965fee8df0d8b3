"""The k-NN monitor and the evaluator: the vote, distributed embedding through real loaders, real files."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bench.harness import free_port
from model import build_mae
from pipeline.build_shards import main as build_shards
from pipeline.sample_data import main as sample_data
from tests.helpers import REPO, start_job, tiny_preset_model
from train.evaluate import linear_probe
from train.evaluate import main as evaluate_main
from train.knn import Embedded, knn_top1


def labelled_features(labels: torch.Tensor, classes: int, noise: float, seed: int) -> Embedded:
    generator = torch.Generator().manual_seed(seed)
    features = F.one_hot(labels, classes).float() + noise * torch.randn(len(labels), classes, generator=generator)
    features = F.normalize(features, dim=1)
    return Embedded({"cls": features, "patch_mean": features}, labels)


def test_knn_is_perfect_on_features_that_encode_the_label_and_chance_on_shuffled_labels():
    classes = 10
    train_labels, val_labels = torch.arange(500) % classes, torch.arange(200) % classes
    train, val = labelled_features(train_labels, classes, 0.05, 0), labelled_features(val_labels, classes, 0.05, 1)
    result = knn_top1(train, val)
    assert result["knn_top1_cls"] == result["knn_top1_patch_mean"] == 1.0
    assert (result["knn_train_samples"], result["knn_val_samples"]) == (500, 200)
    shuffled = Embedded(train.features, train_labels[torch.randperm(500, generator=torch.Generator().manual_seed(2))])
    assert knn_top1(shuffled, val)["knn_top1_cls"] < 0.25  # chance is 0.10
    assert linear_probe(train, val, epochs=5) == 1.0


def test_two_ranks_give_the_one_rank_result(tmp_path):
    root = tmp_path
    sample_data([str(root / "images"), "--classes", "4", "--train-per-class", "8", "--val-per-class", "3"])
    for split in ("train", "val"):
        assert build_shards([str(root / "images" / split), str(root / "shards"), "--split", split, "--shard-size-mb",
                             "0.2", "--workers", "1", "--quiet"]) == 0
    script = REPO / "tests" / "scripts" / "knn_ranks.py"
    results = []
    for world in (1, 2):
        port = free_port()
        ranks = [start_job([sys.executable, str(script), str(root / "shards")], cwd=REPO,
                           env={"PYTHONPATH": str(REPO), "RANK": str(r), "WORLD_SIZE": str(world),
                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PATH": ""},
                           stderr=subprocess.PIPE) for r in range(world)]
        outs = [p.communicate(timeout=300) for p in ranks]
        assert all(p.returncode == 0 for p in ranks), outs
        results.append(json.loads(outs[0][0].strip().splitlines()[-1]))
    assert results[0] == results[1]
    assert results[0]["knn_train_samples"] == 32 and results[0]["knn_val_samples"] == 12


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    sample_data([str(root / "images"), "--classes", "4", "--train-per-class", "12", "--val-per-class", "4"])
    for split in ("train", "val"):
        assert build_shards([str(root / "images" / split), str(root / "shards"), "--split", split, "--shard-size-mb",
                             "0.5", "--workers", "1", "--quiet"]) == 0
    return root / "shards"


def test_the_evaluator_reads_an_export_and_a_reference_layout_file(sample_shards, tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_preset_model()
    reference = tmp_path / "reference.pth"
    torch.save({"model": model.state_dict()}, reference)  # the released files' layout: no config inside
    assert evaluate_main([str(reference), "--data", str(sample_shards)]) == 2
    assert "does not say which model it holds: pass --model" in capsys.readouterr().err
    out = tmp_path / "reference.json"
    assert evaluate_main([str(reference), "--data", str(sample_shards), "--model", "mae_vit_tiny_patch16",
                          "--img-size", "64", "--probe-epochs", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "all weights loaded" in result["source"] and result["knn_val_samples"] == 16
    assert 0 <= result["linear_probe_top1"] <= 1
    # A train.export file carries its config, so no --model is needed; same weights, same result.
    exported = tmp_path / "exported.pth"
    from dataclasses import asdict

    from train.config import load_config
    torch.save({"model": model.state_dict(), "maeflow": {"config": asdict(load_config("configs/tiny.toml"))}},
               exported)
    assert evaluate_main([str(exported), "--data", str(sample_shards), "--probe-epochs", "0", "--out",
                          str(tmp_path / "exported.json")]) == 0
    again = json.loads((tmp_path / "exported.json").read_text())
    assert again["knn_top1_cls"] == result["knn_top1_cls"]
    assert build_mae("mae_vit_tiny_patch16", img_size=64).img_size == (64, 64)
