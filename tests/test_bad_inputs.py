"""What every command answers to a user's mistake: one line naming the thing and the fix, a
documented exit status (README, "Exit codes": 2 refused), never a traceback. The training command's
own cases are in test_config.py and test_resume.py; damaged shards in test_build_shards.py."""

import pytest
import torch

from bench.__main__ import main as bench_main
from pipeline.build_shards import main as build_main
from tests.helpers import REPO, mark_checkpoint, tiny_preset_model
from train.config import load_config
from train.evaluate import main as evaluate_main
from train.export import main as export_main


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def argparse_refusal(capsys, command, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as refused:
        command(argv)
    assert refused.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_export_names_what_is_missing_or_unwritable(tmp_path, capsys):
    assert export_main([str(tmp_path / "nowhere"), "--to", str(tmp_path / "x.pth")]) == 2
    assert "nowhere is not a training output folder (no config.json there)" in one_line_error(
        capsys
    )
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(load_config(REPO / "configs" / "tiny.toml").to_json())
    assert export_main([str(run), "--to", str(tmp_path / "x.pth")]) == 2
    assert "holds no complete checkpoint" in one_line_error(capsys)
    # a config of another maeflow's format
    for written in ("{not json", "{}", '{"task": "pretrain", "format": 0}'):
        (run / "config.json").write_text(written)
        assert export_main([str(run), "--to", str(tmp_path / "x.pth")]) == 2
        assert "config.json is not a config this maeflow saved" in one_line_error(capsys)


def test_export_to_a_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    # A run folder as export reads it: config and a stage-0 fp32 checkpoint of the tiny model.
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    torch.save({"module": tiny_preset_model().state_dict()}, tag / "mp_rank_00_model_states.pt")
    mark_checkpoint(tag, step=1)
    (run / "config.json").write_text(load_config(REPO / "configs" / "tiny.toml").to_json())
    assert export_main([str(run), "--to", str(tmp_path / "missing" / "folder" / "x.pth")]) == 2
    assert "cannot write" in one_line_error(capsys)
    assert export_main([str(run), "--to", str(tmp_path / "x.pth")]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pipeline", "--data", "/no/such/shards"], "--data /no/such/shards: no train.json there"),
        (
            ["pipeline", "--preset", "vit_giant"],
            "--preset vit_giant: no such preset (known: finetune_tiny",
        ),
        (["pipeline", "--local-batch-size", "0"], "--local-batch-size must be at least 1, got 0"),
        (["model", "--data", "/tmp"], "--data goes with the pipeline stage"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bench_refuses_bad_arguments_in_one_line(capsys, argv, message):
    assert message in argparse_refusal(capsys, bench_main, argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--shard-size-mb", "0"],
            "--shard-size-mb and --max-pixels must be positive, --workers and --sort-buffer at "
            "least 1",
        ),
        (["--workers", "0"], "--workers and --sort-buffer at least 1"),
        (["--sort-buffer", "0"], "--workers and --sort-buffer at least 1"),
        (["--max-pixels", "-1"], "--max-pixels must be positive"),
        (["--split", "../elsewhere"], "a split name is letters, digits"),
    ],
)
def test_the_shard_builder_refuses_bad_arguments_in_one_line(tmp_path, capsys, argv, message):
    assert message in argparse_refusal(
        capsys, build_main, [str(tmp_path), str(tmp_path / "out"), *argv]
    )
    assert not (tmp_path / "out").exists()


def test_the_shard_builder_names_a_file_where_a_folder_belongs(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert build_main([str(a_file), str(tmp_path / "out"), "--quiet"]) == 2
    assert "is not a folder, a tar, a .tar.gz or a zip" in one_line_error(capsys)
    assert build_main(["--verify", str(tmp_path), "--split", "train"]) == 2
    assert "train.json not found: nothing to verify" in one_line_error(capsys)


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "0", "--temperature must be positive, got 0.0"),
    ("--batch", "0", "--batch must be at least 1, got 0"),
    ("--probe-epochs", "-1", "--probe-epochs must be >= 0, got -1"),
    ("--train-samples", "-5", "--train-samples must be >= 0, got -5"),
])
def test_the_evaluator_refuses_bad_numbers(tmp_path, capsys, flag, value, message):
    assert message in argparse_refusal(
        capsys, evaluate_main, [str(tmp_path), "--data", str(tmp_path), flag, value]
    )


def test_the_evaluator_names_a_missing_source(tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "nothing.pth"), "--data", str(tmp_path)]) == 2
    assert "nothing.pth: no such run folder or weight file" in one_line_error(capsys)
