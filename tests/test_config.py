"""The typed config: presets, overrides, one-line errors before any work, defaults equal to the
presets."""

import dataclasses

import pytest

from tests.helpers import REPO
from train.classifier_task import ClassifierTask
from train.config import ConfigError, config_from_json, describe, flat_fields, load_config
from train.finetune import main as finetune_main
from train.mae_task import MaeTask, PretrainConfig
from train.pretrain import main as pretrain_main
from train.recipe import plan_batch

PRESETS = ("vit_b16_1600ep", "vit_l16_1600ep", "vit_h14_1600ep")


def test_presets_follow_the_paper_recipe():
    for name, model in zip(
        PRESETS,
        ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"),
        strict=True,
    ):
        cfg = load_config(REPO / "configs" / f"{name}.toml")
        assert cfg.model.name == model and cfg.model.norm_pix_loss and cfg.model.mask_ratio == 0.75
        o = cfg.optim
        recipe = (
            o.global_batch_size,
            o.blr,
            o.betas,
            o.weight_decay,
            o.warmup_epochs,
            o.epochs,
            o.gradient_clipping,
        )
        assert recipe == (4096, 1.5e-4, (0.9, 0.95), 0.05, 40, 1600, 0.0)
        assert cfg.runtime.precision == "autocast_bf16" and cfg.runtime.zero_stage == 0
        # Runs as shipped on any power-of-two allocation up to 512 GPUs, within its memory limit.
        for ranks in (1, 8, 64, 512):
            plan = plan_batch(o, ranks)
            assert (
                plan.global_batch_size == 4096 and plan.local_batch_size <= o.max_local_batch_size
            )


def test_defaults_are_the_presets_choices():
    """A user's own config that leaves a field out trains as the presets do, wherever all three
    agree."""
    defaults = flat_fields(PretrainConfig())
    presets = [flat_fields(load_config(REPO / "configs" / f"{name}.toml")) for name in PRESETS]
    agreed = {
        key: presets[0][key] for key in defaults if all(p[key] == presets[0][key] for p in presets)
    }
    differ = {
        key: (defaults[key], value) for key, value in agreed.items() if defaults[key] != value
    }
    assert not differ, f"defaults that contradict every preset: {differ}"
    assert {"runtime.zero_stage", "runtime.precision", "optim.blr", "optim.betas"} <= set(agreed)


def test_every_field_is_documented():
    lines = describe(PretrainConfig())
    assert len(lines) == len(flat_fields(PretrainConfig()))
    undocumented = [line for line in lines if line.endswith("# ")]
    assert all(" = " in line for line in lines) and not undocumented, undocumented


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.bogus=1", "unknown config key 'optim.bogus'"),
        ("optim.blr=fast", "optim.blr: expected float, got 'fast'"),
        ("runtime.zero_stage=5", "runtime.zero_stage must be one of 0, 1, 2, 3, got '5'"),
        ("data.backend=opencv", "data.backend must be one of dali, pil, synthetic, got 'opencv'"),
        ("model.name=vit_giant", "model.name 'vit_giant' is not one of"),
        ("model.init=/nope.pth", "model.init /nope.pth: no such file"),
        (
            "checkpoint.every_minutes=-5",
            "checkpoint.every_minutes and checkpoint.every_steps must be >= 0",
        ),
        (
            "checkpoint.every_steps=-1",
            "checkpoint.every_minutes and checkpoint.every_steps must be >= 0",
        ),
        ("data.num_threads=-3", "data.num_threads must be >= 0"),
        ("data.img_size=0", "data.img_size must be positive"),
        ("optim.min_lr=-1", "optim.min_lr"),
        ("optim.betas=0.9,1.5", "optim.betas must be in [0, 1)"),
        ("log.viz_images=0", "log.viz_images must be >= 1"),
        ("optim.global_batch_size=0", "optim.global_batch_size must be positive"),
        ("max_steps=-2", "max_steps must be >= 0"),
        ("model.mask_ratio=1.0", "model.mask_ratio must be in [0, 1)"),
    ],
)
def test_a_bad_value_is_refused_when_the_config_loads(override, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        load_config(REPO / "configs" / "tiny.toml", [override])


def test_config_errors_are_one_line_before_any_work(shards, tmp_path, capsys):
    cases = [
        (["--set", "optim.blr=fast"], "optim.blr: expected float, got 'fast'"),
        (
            ["--config", "configs/nope.toml"],
            "config preset configs/nope.toml not found: give a preset file or a name "
            "in configs/ (finetune_tiny, finetune_vit_b16",
        ),
        (["--data", str(tmp_path / "none")], "shard folder"),
        (
            ["--output", str(tmp_path / "old")],
            "already holds a run (checkpoint step00000007): pass --resume",
        ),
        (
            ["--output", str(tmp_path / "logged")],
            "already holds a run (config.json, metrics.jsonl): pass --resume",
        ),
        (
            ["--resume", "step00000003", "--output", str(tmp_path / "old")],
            "holds no complete checkpoint step00000003; complete ones: step00000007",
        ),
        (
            ["--resume", "12", "--output", str(tmp_path / "old")],
            "holds no complete checkpoint step00000012",
        ),
        (["--max-steps", "-1"], "max_steps must be >= 0"),
        (["--log-every", "0"], "log.log_every must be >= 1"),
        (["--set", "optim.lr"], "--set expects key=value, got 'optim.lr'"),
        (["--output", str(tmp_path / "a_file")], "is a file, not a folder"),
        (["--data", str(tmp_path / "a_file")], "is a file, not a shard folder"),
    ]
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "old" / "checkpoints" / "step00000007").mkdir(parents=True)
    # complete, to the eye
    (tmp_path / "old" / "checkpoints" / "step00000007" / "train_state.json").write_text("{}")
    (tmp_path / "old" / "checkpoints" / "latest").write_text("step00000007")
    (tmp_path / "logged").mkdir()
    (tmp_path / "logged" / "config.json").write_text("{}")
    (tmp_path / "logged" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for extra, message in cases:
        argv = [
            "--config",
            "configs/tiny.toml",
            "--data",
            str(shards),
            "--output",
            str(tmp_path / "x"),
            *extra,
        ]
        assert pretrain_main(argv) == 2, extra  # RunEnd.REFUSED, the code for "nothing was trained"
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    assert (tmp_path / "logged" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_print_config_plans_the_batch_for_a_rank_count_and_checks_the_data(
    shards, tmp_path, capsys
):
    argv = ["--config", "configs/vit_h14_1600ep.toml", "--data", str(shards), "--print-config"]
    assert pretrain_main([*argv, "--ranks", "8"]) == 2  # 64 samples make no step of 4096
    assert "64 training samples make no optimizer step" in capsys.readouterr().err
    assert pretrain_main([*argv, "--ranks", "8", "--set", "optim.global_batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "batch on 8 ranks: 16 = 2 local x 1 accumulation x 8 ranks" in out
    assert (
        "data: 64 training samples" in out
        and "4 optimizer steps per epoch" in out
        and '"stage": 0' in out
    )
    assert (
        pretrain_main(["--config", "configs/vit_h14_1600ep.toml", "--print-config", "--ranks", "8"])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "batch on 8 ranks: 4096 = 128 local x 4 accumulation x 8 ranks" in out
        and "peak lr: 0.0024" in out
    )
    # Without --data: ImageNet-1k's size, the run's length, and its checkpoints from the model's
    # shapes (ViT-H MAE).
    assert (
        "data: 1,281,167 training samples (no --data: ImageNet-1k's train split assumed): 312 "
        "optimizer steps per epoch"
    ) in out
    assert "run: 1600 epochs = 499,200 optimizer steps, 2,044.7 M images" in out
    assert (
        "checkpoints: about 7.88 GB each (657.1 M parameters' fp32 weights" in out
        and "(31.5 GB)" in out
    )
    assert (
        pretrain_main(
            ["--config", "vit_h14_1600ep", "--print-config", "--set", "data.num_threads=12"]
        )
        == 0
    )
    assert (
        "loader: DALI's GPU decoding reserves 384 MiB of GPU memory and 384 MiB of pinned host "
        "memory per rank at 12 decoder threads (data.num_threads)"
    ) in capsys.readouterr().out
    assert finetune_main(["--config", "finetune_vit_b16", "--print-config", "--ranks", "8", "--set",
                          "finetune.mode=linear_probe"]) == 0
    out = capsys.readouterr().out  # a probe trains the head: AdamW's moments for it alone
    assert (
        "about 0.35 GB each (86.6 M parameters' fp32 weights, AdamW's two moments of the 0.8 M "
        "trained)"
        in out
    )
    for ranks in ("-8", "0"):
        assert (
            pretrain_main(
                ["--config", "configs/vit_h14_1600ep.toml", "--print-config", "--ranks", ranks]
            )
            == 2
        )
        assert f"--ranks must be at least 1, got {ranks}" in capsys.readouterr().err
    assert pretrain_main([*argv[:3], str(tmp_path / "nowhere"), "--print-config"]) == 2
    assert "shard folder" in capsys.readouterr().err


def test_a_saved_config_reads_back_and_a_damaged_one_is_named(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.toml", ["optim.lr=0.5"])
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert dataclasses.asdict(config_from_json(tmp_path / "config.json")) == dataclasses.asdict(cfg)
    for damaged in (
        '{"optim": {"lr": ',
        '{"optim": {"lr": 0.5}}',
        '{"task": "pretrain", "format": 9}',
    ):
        # cut short; of no format; of another maeflow's format
        (tmp_path / "config.json").write_text(damaged)
        with pytest.raises(ConfigError, match=r"config.json is not a config this maeflow saved"):
            config_from_json(tmp_path / "config.json")


def test_a_runs_config_json_is_a_config_and_presets_are_found_from_any_folder(
    tmp_path, monkeypatch
):
    cfg = load_config("tiny", ["optim.lr=0.5"])
    (tmp_path / "config.json").write_text(cfg.to_json())
    monkeypatch.chdir(tmp_path)  # not the repository: preset names still resolve
    again = load_config(tmp_path / "config.json", ["max_steps=3"], task=MaeTask)
    assert (
        dataclasses.replace(again, max_steps=0) == cfg
        and load_config("vit_b16_1600ep").model.name == "mae_vit_base_patch16"
    )
    with pytest.raises(
        ConfigError, match=r"is a MAE pre-training preset: run it with train/pretrain\.py"
    ):
        load_config(tmp_path / "config.json", task=ClassifierTask)


# a 16-core node of 8 ranks; train/slurm.sbatch's 12 per rank
@pytest.mark.parametrize("threads", [16 // 8, 12])
def test_dalis_gpu_decoding_reserves_under_a_gb_per_rank_on_a_full_node(threads):
    """nvJPEG's paddings are per decoder thread (one device buffer, two pinned host buffers) and two
    pipelines are alive for most of an epoch: what a rank reserves must leave its GPU to the model,
    and 8 ranks' pinned memory the node's."""
    from pipeline.dali_graph import PIPELINES_ALIVE, reservation

    reserved = reservation(threads)
    assert reserved.gpu_bytes <= 2**30 and reserved.pinned_bytes <= 2**30
    # DALI's own default padding per thread
    assert reserved.gpu_bytes == PIPELINES_ALIVE * threads * 16 * 2**20
