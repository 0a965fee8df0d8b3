"""The k-NN monitor and the evaluator: the vote, distributed embedding through real loaders, real
files."""

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import build_mae
from pipeline.build_shards import main as build_shards
from pipeline.sample_data import main as sample_data
from tests.helpers import REPO, start_job, tiny_preset_model
from train.distributed import free_port
from train.evaluate import linear_probe
from train.evaluate import main as evaluate_main
from train.knn import Embedded, knn_correct, knn_top1


def labelled_features(labels: torch.Tensor, classes: int, noise: float, seed: int) -> Embedded:
    generator = torch.Generator().manual_seed(seed)
    features = F.one_hot(labels, classes).float() + noise * torch.randn(
        len(labels), classes, generator=generator
    )
    features = F.normalize(features, dim=1)
    return Embedded({"cls": features, "patch_mean": features}, labels)


def test_knn_is_perfect_on_features_that_encode_the_label_and_chance_on_shuffled_labels():
    classes = 10
    train_labels, val_labels = torch.arange(500) % classes, torch.arange(200) % classes
    train, val = (
        labelled_features(train_labels, classes, 0.05, 0),
        labelled_features(val_labels, classes, 0.05, 1),
    )
    result = knn_top1(train, val)
    assert result["knn_top1_cls"] == result["knn_top1_patch_mean"] == 1.0
    assert (result["knn_train_samples"], result["knn_val_samples"]) == (500, 200)
    shuffled = Embedded(
        train.features,
        train_labels[torch.randperm(500, generator=torch.Generator().manual_seed(2))],
    )
    assert knn_top1(shuffled, val)["knn_top1_cls"] < 0.25  # chance is 0.10
    assert linear_probe(train, val, epochs=5) == 1.0


def test_the_linear_probe_survives_a_last_batch_of_one_sample():
    """257 samples in batches of 256: every epoch's last batch holds one sample, which BatchNorm
    cannot train on."""
    classes = 4
    train = labelled_features(torch.arange(257) % classes, classes, 0.05, 0)
    val = labelled_features(torch.arange(40) % classes, classes, 0.05, 1)
    assert linear_probe(train, val, epochs=3, batch=256) == 1.0


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    """One close neighbour of class 1 against two farther ones of class 0: the unweighted majority
    says 0, the exp(sim / T) weights say 1 (e^(0.99/0.07) > 2 e^(0.6/0.07))."""
    query = torch.tensor([[1.0, 0.0]])
    angle_close, angle_far = torch.acos(torch.tensor(0.99)), torch.acos(torch.tensor(0.6))
    train = torch.stack([torch.stack([angle_close.cos(), angle_close.sin()]),
                         torch.stack([angle_far.cos(), angle_far.sin()]),
                         torch.stack([angle_far.cos(), -angle_far.sin()])])
    labels = torch.tensor([1, 0, 0])
    assert (
        knn_correct(train, labels, query, torch.tensor([1]), classes=2, k=3, temperature=0.07) == 1
    )
    # With a temperature so high that every weight is about 1, the majority wins: the weighting is
    # what decides.
    assert (
        knn_correct(train, labels, query, torch.tensor([1]), classes=2, k=3, temperature=1e6) == 0
    )
    assert (
        knn_correct(train, labels, query, torch.tensor([0]), classes=2, k=3, temperature=1e6) == 1
    )


def uneven_split_rank(rank: int, world: int, store_path: str, results) -> None:
    """Rank `rank` of a gloo group: rank 0 holds 3 train rows of class 1, rank 1 holds 1; each holds
    val rows."""
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    # every real neighbour is far from the queries
    away = F.normalize(torch.tensor([[-1.0, 0.2]]), dim=1)
    train_rows = 3 if rank == 0 else 1
    train = Embedded({"cls": away.repeat(train_rows, 1), "patch_mean": away.repeat(train_rows, 1)},
                     torch.ones(train_rows, dtype=torch.int64))
    queries = 2 if rank == 0 else 1
    near = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1).repeat(queries, 1)
    val = Embedded({"cls": near, "patch_mean": near}, torch.ones(queries, dtype=torch.int64))
    results[rank] = knn_top1(train, val, k=20, temperature=0.07)
    dist.destroy_process_group()


def test_knn_over_an_uneven_split_counts_exactly_and_never_votes_with_padding(tmp_path):
    """Gathering pads the shorter rank's rows with zeros of label 0; a zero row has similarity 0
    with every query, far more than the real rows' -0.98, so one that became a neighbour would
    outvote them all."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(uneven_split_rank, args=(2, str(tmp_path / "store"), results), nprocs=2)
    for rank in (0, 1):
        assert results[rank] == {
            "knn_top1_cls": 1.0,
            "knn_top1_patch_mean": 1.0,
            "knn_train_samples": 4,
            "knn_val_samples": 3,
        }


def test_two_ranks_give_the_one_rank_result(tmp_path):
    root = tmp_path
    sample_data(
        [str(root / "images"), "--classes", "4", "--train-per-class", "8", "--val-per-class", "3"]
    )
    for split in ("train", "val"):
        assert (
            build_shards(
                [
                    str(root / "images" / split),
                    str(root / "shards"),
                    "--split",
                    split,
                    "--shard-size-mb",
                    "0.2",
                    "--workers",
                    "1",
                    "--quiet",
                ]
            )
            == 0
        )
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
    sample_data(
        [str(root / "images"), "--classes", "4", "--train-per-class", "12", "--val-per-class", "4"]
    )
    for split in ("train", "val"):
        assert (
            build_shards(
                [
                    str(root / "images" / split),
                    str(root / "shards"),
                    "--split",
                    split,
                    "--shard-size-mb",
                    "0.5",
                    "--workers",
                    "1",
                    "--quiet",
                ]
            )
            == 0
        )
    return root / "shards"


def test_the_evaluator_reads_an_export_and_a_reference_layout_file(sample_shards, tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_preset_model()
    reference = tmp_path / "reference.pth"
    # the released files' layout: no config inside
    torch.save({"model": model.state_dict()}, reference)
    assert evaluate_main([str(reference), "--data", str(sample_shards)]) == 2
    assert "does not say which model it holds: pass --model" in capsys.readouterr().err
    out = tmp_path / "reference.json"
    assert (
        evaluate_main(
            [
                str(reference),
                "--data",
                str(sample_shards),
                "--model",
                "mae_vit_tiny_patch16",
                "--img-size",
                "64",
                "--probe-epochs",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert "all weights loaded" in result["source"] and result["knn_val_samples"] == 16
    # The sample classes differ in colour and layout: even a random-init encoder's features separate
    # them, so a probe that learns is far above the 25% of chance (measured: 94%), and one that does
    # not is near it.
    assert result["linear_probe_top1"] > 0.6 and result["knn_top1_patch_mean"] > 0.6
    # A train.export file carries its config, so no --model is needed; same weights, same result.
    exported = tmp_path / "exported.pth"
    from pipeline.formats import stamp
    from train.config import load_config

    # as train.export writes
    provenance = stamp("weights", {"config": load_config("configs/tiny.toml").to_dict()})
    torch.save({"model": model.state_dict(), "maeflow": provenance}, exported)
    assert (
        evaluate_main(
            [
                str(exported),
                "--data",
                str(sample_shards),
                "--probe-epochs",
                "0",
                "--out",
                str(tmp_path / "exported.json"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "exported.json").read_text())
    assert again["knn_top1_cls"] == result["knn_top1_cls"]
    assert build_mae("mae_vit_tiny_patch16", img_size=64).img_size == (64, 64)


def test_the_evaluator_refuses_splits_with_other_class_lists_and_names_missing_splits(
    sample_shards, tmp_path, capsys
):
    """A val split labelled in another class list would score 0% with no warning: refused, naming
    the fix."""
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(sample_shards, mixed)
    images = sample_shards.parent / "images" / "val"
    subset = tmp_path / "val_subset"
    for cls in sorted(p.name for p in images.iterdir())[1:]:  # one class fewer: labels shift by one
        shutil.copytree(images / cls, subset / cls)
    for path in mixed.glob("val*"):
        path.unlink()
    assert (
        build_shards(
            [
                str(subset),
                str(tmp_path / "elsewhere"),
                "--split",
                "val",
                "--workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    for path in (tmp_path / "elsewhere").glob("val*"):
        shutil.copy(path, mixed / path.name)
    torch.manual_seed(0)
    reference = tmp_path / "reference.pth"
    torch.save({"model": tiny_preset_model().state_dict()}, reference)
    args = [
        str(reference),
        "--model",
        "mae_vit_tiny_patch16",
        "--img-size",
        "64",
        "--probe-epochs",
        "0",
    ]
    assert evaluate_main([*args, "--data", str(mixed)]) == 2
    err = capsys.readouterr().err
    assert (
        "the train and val shards" in err
        and "label different class lists (4 vs 3 classes: 1 missing" in err
    )
    assert evaluate_main([*args, "--data", str(sample_shards), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "test.json not found (splits here: train, val)" in err
    with pytest.raises(SystemExit) as refused:  # argparse's way: usage, one error line, status 2
        evaluate_main([*args, "--data", str(sample_shards), "--k", "0"])
    assert refused.value.code == 2 and "--k must be at least 1, got 0" in capsys.readouterr().err
