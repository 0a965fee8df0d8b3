"""Fine-tuning's recipe held to the paper and to timm, the library the reference fine-tuning code
runs: the optimizer groups, LARS, the classifier and its weights, drop path, RandAugment, random
erasing, mixup/cutmix and label smoothing. Small models in float64; real DALI pipelines and timm's
own modules, no stand-ins."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from model import build_mae
from model.flops import classifier_train_flops
from model.mae import drop_path_scales
from model.pos_embed import resize_pos_embed, sincos_2d
from model.vit import build_classifier, load_encoder
from pipeline import build_loader
from pipeline.augment import FINETUNE, LINEAR_PROBE, MAGNITUDE_LEVELS, RAND_AUGMENT_OPS
from pipeline.batch_augment import (
    MixConfig,
    MixDraw,
    cutmix_draw,
    draw_mix,
    mix_batch,
    random_erase,
    smooth_targets,
)
from pipeline.timm_ops import timm_data_module
from tests.helpers import mark_checkpoint
from train.classifier_task import (
    class_count,
    image_augmentation,
    mix_config,
    pretrained_weights,
    top_hits,
)
from train.config import ConfigError, load_config
from train.recipe import Lars, layer_decay_groups

DEPTH = 4  # the tiny preset's encoder


def tiny_classifier(probe: bool = False, num_classes: int = 5) -> torch.nn.Module:
    return build_classifier(
        "mae_vit_tiny_patch16", 32, num_classes, drop_path_rate=0.1, probe=probe
    ).double()


# ---------------------------------------------------------------- optimizer groups and LARS


def expected_scale(name: str, layer_decay: float) -> float:
    """The recipe's formula, written out per parameter name: embeddings decay most, the head not at
    all."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return layer_decay ** (DEPTH + 1)
    if name.startswith("blocks."):
        return layer_decay ** (DEPTH - int(name.split(".")[1]))
    return 1.0  # fc_norm, head


def test_layer_decay_groups_follow_the_recipe():
    model = tiny_classifier()
    groups = layer_decay_groups(model, DEPTH, weight_decay=0.05, layer_decay=0.65)
    group_of = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    # each parameter once
    assert len(group_of) == sum(len(g["params"]) for g in groups) == len(names)
    for name, param in names.items():
        group = group_of[id(param)]
        assert group["lr_scale"] == pytest.approx(expected_scale(name, 0.65), rel=1e-12), name
        no_decay = param.ndim == 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert group_of[id(names["head.weight"])]["lr_scale"] == 1.0
    assert group_of[id(names["patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(0.65 ** 5)


def test_the_probe_trains_only_its_head():
    model = tiny_classifier(probe=True)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    groups = layer_decay_groups(model, DEPTH, weight_decay=0.0, layer_decay=1.0)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(model.head[1].weight), id(model.head[1].bias)}
    assert isinstance(model.head[0], torch.nn.BatchNorm1d) and not model.head[0].affine


def test_lars_step_matches_its_formula():
    torch.manual_seed(0)
    weight, bias = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    params = [torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())]
    grads = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    optimizer = Lars([{"params": params}], lr=0.5, weight_decay=0.1)
    for _ in range(2):  # the second step carries momentum
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    expected_w, expected_b, momentum_w, momentum_b = weight.clone(), bias.clone(), 0, 0
    for _ in range(2):
        update = grads[0] + 0.1 * expected_w
        update = update * 0.001 * expected_w.norm() / update.norm()
        momentum_w = 0.9 * momentum_w + update
        expected_w = expected_w - 0.5 * momentum_w
        momentum_b = 0.9 * momentum_b + grads[1]  # 1-D: neither decay nor trust ratio
        expected_b = expected_b - 0.5 * momentum_b
    torch.testing.assert_close(params[0].data, expected_w)
    torch.testing.assert_close(params[1].data, expected_b)


# ---------------------------------------------------------------- the classifier and its weights


def test_the_classifier_takes_a_pretrained_encoder_at_another_resolution():
    mae = build_mae("mae_vit_tiny_patch16", img_size=32)
    model = build_classifier("mae_vit_tiny_patch16", 64, 5)
    fresh = load_encoder(model, mae.state_dict(), "mae.pth")
    assert sorted(fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    torch.testing.assert_close(model.blocks[3].mlp.fc2.weight, mae.blocks[3].mlp.fc2.weight)
    assert model.pos_embed.shape == (1, 1 + 16, 192)
    # The resampled grid keeps the cls slot and stays a smooth function of position.
    torch.testing.assert_close(model.pos_embed[0, 0], mae.pos_embed[0, 0])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_weights_of_another_model_or_class_count_are_refused_in_one_line():
    base = build_classifier("mae_vit_tiny_patch16", 32, 5)
    with pytest.raises(
        ValueError, match=r"^other\.pth: its head is for another number of classes: head\.weight"
    ):
        load_encoder(
            base, build_classifier("mae_vit_tiny_patch16", 32, 7).state_dict(), "other.pth"
        )
    with pytest.raises(
        ValueError, match=r"^big\.pth: it holds another model: cls_token is \[1, 1, 768\]"
    ):
        load_encoder(base, build_mae("mae_vit_base_patch16", img_size=32).state_dict(), "big.pth")
    with pytest.raises(ValueError, match="not an encoder of this model: 2 tensors missing"):
        load_encoder(
            base,
            {k: v for k, v in base.state_dict().items() if "blocks.0.attn.qkv" not in k},
            "cut.pth",
        )


def test_start_points_that_do_not_fit_are_refused_in_one_line(shards, tmp_path):
    run = tmp_path / "pretrained_run"
    run.mkdir()
    (run / "config.json").write_text(load_config("tiny").to_json())
    with pytest.raises(
        ConfigError,
        match=f"^model.init {run} is a pre-training run of mae_vit_tiny_patch16; this "
        "config fine-tunes mae_vit_base_patch16",
    ):
        pretrained_weights(str(run), "mae_vit_base_patch16")
    with pytest.raises(ConfigError, match="not a maeflow run"):
        pretrained_weights(str(tmp_path), "mae_vit_tiny_patch16")
    cfg = load_config("finetune_tiny", [f"data.shards={shards}"])
    assert class_count(cfg) == 4  # the conftest's shards
    cfg.finetune.num_classes = 10
    with pytest.raises(
        ConfigError, match=r"finetune\.num_classes is 10, but the train shards .* label 4 classes"
    ):
        class_count(cfg)


def test_drop_path_keeps_the_expected_value():
    torch.manual_seed(0)
    x = torch.ones(200_000, 3, dtype=torch.float64)
    dropped = x * drop_path_scales(torch.tensor(0.3, dtype=torch.float64), len(x))[:, None]
    # whole samples dropped, the rest rescaled
    assert set(dropped[:, 0].unique().tolist()) == {0.0, 1 / 0.7}
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.01)
    assert (dropped[:, 0] == 0).double().mean().item() == pytest.approx(0.3, abs=0.005)
    model = tiny_classifier().eval()  # evaluation: nothing dropped
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(model(images), model(images))
    rates = [block.drop_path_rate for block in tiny_classifier().blocks]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # rising linearly to the last block


def test_vit_b_fine_tuning_flops():
    """ViT-B/16 at 224: 17.6 GFLOPs (multiply-adds) forward, the figure the ViT papers quote."""
    model = build_classifier("mae_vit_base_patch16", 224, 1000)
    forward_macs = classifier_train_flops(model) / 3 / 2
    assert forward_macs == pytest.approx(17.6e9, rel=0.01)


# ---------------------------------------------------------------- RandAugment


def test_rand_augment_ops_are_timms_increasing_set():
    auto_augment = timm_data_module("auto_augment")
    assert [op.timm_name for op in RAND_AUGMENT_OPS] == list(
        auto_augment._RAND_INCREASING_TRANSFORMS
    )
    # the MAE recipe's "rand-m9-mstd0.5-inc1"
    assert FINETUNE.timm_policy() == "rand-m9-n2-mstd0.5-p0.5-inc1"
    timm_ops = auto_augment.rand_augment_transform(FINETUNE.timm_policy(), {}).ops
    assert [op.name for op in timm_ops] == [op.timm_name for op in RAND_AUGMENT_OPS]
    assert {op.prob for op in timm_ops} == {0.5} and {op.magnitude_std for op in timm_ops} == {0.5}


@pytest.mark.parametrize("level", [3, 6, 9])
def test_dali_rand_augment_parameters_equal_timms(level):
    """Each DALI op's parameter at bin `level` of 11 is what timm's op gets at magnitude `level` of
    10 (below 10: at level 10 timm's posterize keeps no bit, where DALI keeps one rather than blank
    the image)."""
    from pipeline.dali_rand_augment import rand_augment_suite

    auto_augment = timm_data_module("auto_augment")
    hparams = {"translate_pct": 0.45}
    for op, dali_op in zip(RAND_AUGMENT_OPS, rand_augment_suite(FINETUNE), strict=True):
        assert dali_op.name == op.dali_name
        to_arg = auto_augment.LEVEL_TO_ARG[op.timm_name]
        if to_arg is None:
            continue
        random.seed(0)
        expected = to_arg(level, hparams)[0]
        magnitude = np.linspace(*dali_op.mag_range, MAGNITUDE_LEVELS + 1)[level]
        param = dali_op.mag_to_param(magnitude) if dali_op.mag_to_param else magnitude
        if op.dali_name == "posterize":  # DALI's parameter is the mask of the bits kept
            param = bin(int(param)).count("1")
        elif op.dali_name == "solarize":  # integer pixels at or above 25.6 are those at or above 26
            param = math.ceil(param)
        # PIL's blend (1 - f) blur + f identity as a kernel: its corner is -m/13
        elif op.dali_name == "sharpness":
            param = 1 - 13 * param[0, 0]
        elif op.dali_name.startswith(("shear", "translate")):  # a 2-vector, the other axis 0
            param = max(param, key=abs)
        if op.signed:  # timm negated at random; compare the distance from neutral
            neutral = 1.0 if op.timm_name.endswith("Increasing") else 0.0
            expected, param = abs(expected - neutral), abs(float(param) - neutral)
        assert float(param) == pytest.approx(expected, rel=1e-6), op.timm_name


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_rand_augment_changes_most_images_and_keeps_their_shape(shards, backend):
    """Each of 2 layers applies with probability 1/2: about 3 images in 4 get an op (some ops leave
    an image nearly as it was, so the share visibly changed is lower)."""
    def batch(augment):
        with build_loader(shards, local_batch_size=32, img_size=32, device="cpu", backend=backend,
                          num_threads=1, augment=augment, seed=3) as loader:
            loader.set_epoch(0)
            return next(iter(loader))[0]

    plain, augmented = batch(FINETUNE.__class__(crop_scale=FINETUNE.crop_scale)), batch(FINETUNE)
    assert augmented.shape == plain.shape == (32, 3, 32, 32)
    changed = ((augmented - plain).abs().amax(dim=(1, 2, 3)) > 0.1).double().mean().item()
    assert 0.4 < changed < 0.95


# ---------------------------------------------------------------- random erasing, mixup, cutmix,
# smoothing


def test_random_erasing_matches_timms_statistics():
    timm_erasing = timm_data_module("random_erasing").RandomErasing(
        probability=0.25, mode="pixel", device="cpu"
    )
    torch.manual_seed(0)
    random.seed(0)
    zeros = torch.zeros(3000, 3, 24, 24)
    theirs = torch.stack([timm_erasing(image.clone()) for image in zeros])
    ours = random_erase(
        zeros.clone(), 0.25, np.random.default_rng(0), torch.Generator().manual_seed(0)
    )

    def erased_area(images):
        area = (images != 0).any(dim=1).double().mean(dim=(1, 2))
        return (area > 0).double().mean().item(), area[area > 0].mean().item()

    (their_share, their_area), (our_share, our_area) = erased_area(theirs), erased_area(ours)
    assert our_share == pytest.approx(their_share, abs=0.03) and our_share == pytest.approx(
        0.25, abs=0.03
    )
    assert our_area == pytest.approx(their_area, rel=0.08)
    box = ours[(ours != 0).any(dim=(1, 2, 3))][0]
    # N(0, 1) noise, in normalized units
    assert box[box != 0].std().item() == pytest.approx(1.0, rel=0.3)


@pytest.mark.parametrize("cutmix", [False, True])
def test_mixup_and_cutmix_equal_timms_for_the_same_draws(cutmix):
    mixup = timm_data_module("mixup")
    num_classes, images = 10, torch.randn(6, 3, 16, 20, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 9, 1, 5])
    timm_mix = mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1,
                           num_classes=num_classes)
    for seed in range(40):  # find a draw of the kind under test
        np.random.seed(seed)
        lam, use_cutmix = timm_mix._params_per_batch()
        if use_cutmix == cutmix:
            break
    np.random.seed(seed)
    theirs, their_targets = timm_mix(images.clone(), labels)
    np.random.seed(seed)
    lam, _ = timm_mix._params_per_batch()
    if cutmix:
        (top, bottom, left, right), _ = mixup.cutmix_bbox_and_lam(
            images.shape, lam, correct_lam=True
        )
        draw = cutmix_draw(top, bottom, left, right, 16, 20)
    else:
        draw = MixDraw(lam)
    ours, our_targets = mix_batch(images, labels, draw, num_classes, smoothing=0.1)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_targets, their_targets.double(), check_dtype=False)


def test_label_smoothing_and_mix_draws():
    targets = smooth_targets(torch.tensor([2, 0]), 4, 0.1)
    torch.testing.assert_close(
        targets, torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]])
    )
    mix = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
    draws = [draw_mix(np.random.default_rng(seed), 16, 16, mix) for seed in range(2000)]
    cutmix = [d for d in draws if d.box is not None]
    assert len(cutmix) / len(draws) == pytest.approx(0.5, abs=0.04)
    for d in cutmix:  # the weight is the area actually kept
        top, bottom, left, right = d.box
        assert d.lam == pytest.approx(1 - (bottom - top) * (right - left) / 256)
    mixup_lams = [d.lam for d in draws if d.box is None]
    assert np.mean(mixup_lams) == pytest.approx(0.5, abs=0.03)  # Beta(0.8, 0.8) is symmetric
    # its variance: 1 / (4 (2 alpha + 1))
    assert np.var(mixup_lams) == pytest.approx(0.25 / 2.6, rel=0.15)


def test_the_loaders_augmentation_follows_the_mode():
    finetune, probe = (
        load_config("finetune_vit_b16").finetune,
        load_config("linprobe_vit_l16").finetune,
    )
    # crop (0.08, 1), flip, RandAugment 2 layers at level 9
    assert image_augmentation(finetune) == FINETUNE
    assert image_augmentation(probe) == LINEAR_PROBE  # crop and flip only


def test_top_1_and_top_5_hits():
    logits = torch.tensor([[0.0, 5, 4, 3, 2, 1, -1], [9, 1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7]])
    # first: top; second: 2nd; third: 7th of 7
    top1, top5 = top_hits(logits, torch.tensor([1, 6, 1]))
    assert (int(top1), int(top5)) == (1, 2)
    # 3 classes: top-5 = all
    assert [int(n) for n in top_hits(logits[:, :3], torch.tensor([0, 2, 0]))] == [0, 3]


def test_position_embeddings_resample_smoothly():
    grid = sincos_2d(32, 8, 8).unsqueeze(0)
    assert resize_pos_embed(grid, 8, 8) is grid
    there_and_back = resize_pos_embed(resize_pos_embed(grid, 16, 16), 8, 8)
    torch.testing.assert_close(there_and_back, grid, atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(grid[:, :-1], 4, 4)


def test_finetune_presets_are_the_papers_recipe():
    expected = {
        "finetune_vit_b16": (0.65, 0.1, 5e-4, 100),
        "finetune_vit_l16": (0.75, 0.2, 1e-3, 50),
        "finetune_vit_h14": (0.75, 0.3, 1e-3, 50),
        "finetune_vit_h14_448": (0.75, 0.3, 1e-3, 50),
    }
    for name, (layer_decay, drop, blr, epochs) in expected.items():
        cfg = load_config(name)
        ft, optim = cfg.finetune, cfg.optim
        assert (ft.layer_decay, ft.drop_path, optim.blr, optim.epochs) == (
            layer_decay,
            drop,
            blr,
            epochs,
        ), name
        assert (optim.betas, optim.weight_decay, optim.warmup_epochs, optim.global_batch_size) == \
            ((0.9, 0.999), 0.05, 5, 1024)
        assert (
            ft.label_smoothing,
            ft.mixup_alpha,
            ft.cutmix_alpha,
            ft.erase_prob,
            ft.rand_augment_magnitude,
            ft.rand_augment_layers,
            ft.crop_min_scale,
        ) == (0.1, 0.8, 1.0, 0.25, 9, 2, 0.08)
    assert load_config("finetune_vit_h14_448").data.img_size == 448
    probe = load_config("linprobe_vit_l16")
    assert (
        probe.optim.optimizer,
        probe.optim.blr,
        probe.optim.global_batch_size,
        probe.optim.epochs,
        probe.optim.warmup_epochs,
        probe.optim.weight_decay,
    ) == ("lars", 0.1, 16384, 90, 10, 0.0)
    assert probe.finetune.mode == "linear_probe" and not probe.finetune.mixup_alpha


def test_each_mix_alpha_goes_to_its_own_operation_and_the_switch_is_cutmixs_probability():
    def draws(*overrides: str) -> list[MixDraw]:
        mix = mix_config(load_config("finetune_tiny", list(overrides)).finetune)
        return [draw_mix(np.random.default_rng(seed), 16, 16, mix) for seed in range(3000)]

    mixup_only = draws("finetune.mixup_alpha=0.2", "finetune.cutmix_alpha=0")
    assert all(d.box is None for d in mixup_only)  # never cuts
    # Beta(0.2, 0.2)
    assert np.var([d.lam for d in mixup_only]) == pytest.approx(1 / (4 * (2 * 0.2 + 1)), rel=0.1)
    assert all(
        d.box is not None for d in draws("finetune.mixup_alpha=0", "finetune.cutmix_alpha=1")
    )  # never mixes
    both = draws(
        "finetune.mixup_alpha=0.2", "finetune.cutmix_alpha=5", "finetune.mix_switch_prob=0.2"
    )
    # P(cutmix)
    assert sum(d.box is not None for d in both) / len(both) == pytest.approx(0.2, abs=0.025)
    mixed = [d.lam for d in both if d.box is None]
    # mixup's alpha, not cutmix's 5
    assert np.var(mixed) == pytest.approx(1 / (4 * (2 * 0.2 + 1)), rel=0.12)


def test_lars_moves_a_weight_matrix_that_starts_at_zero():
    """The trust ratio needs both norms non-zero; a zero matrix (a freshly zeroed head) takes the
    plain update."""
    weight = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    grad = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight.grad = grad.clone()
    Lars([{"params": [weight]}], lr=0.5, weight_decay=0.1).step()
    torch.testing.assert_close(weight.data, -0.5 * grad)


def reference_bicubic(grid: torch.Tensor, size: int) -> torch.Tensor:
    """[S, S, D] resampled to [size, size, D] by the reference's rule, written out: separable cubic
    convolution (a = -0.75), source coordinate (i + 0.5) x S / size - 0.5 (align_corners=False),
    edge samples repeated."""
    def weight(x: float, a: float = -0.75) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    def along_first_axis(values: torch.Tensor) -> torch.Tensor:
        source = values.shape[0]
        rows = []
        for i in range(size):
            x = (i + 0.5) * source / size - 0.5
            base = math.floor(x)
            rows.append(
                sum(
                    weight(x - (base + k)) * values[min(max(base + k, 0), source - 1)]
                    for k in (-1, 0, 1, 2)
                )
            )
        return torch.stack(rows)

    return along_first_axis(along_first_axis(grid.double()).transpose(0, 1)).transpose(0, 1)


def test_position_embeddings_resize_as_the_reference_resamples_them():
    grid = sincos_2d(32, 8, 8).unsqueeze(0)
    ours = resize_pos_embed(grid, 12, 12)
    expected = reference_bicubic(grid[0, 1:].reshape(8, 8, 32), 12).reshape(1, 144, 32)
    torch.testing.assert_close(ours[:, 1:].double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(ours[:, :1], grid[:, :1])  # the cls slot is kept


def test_exporting_a_fine_tuning_run_keeps_its_learned_position_embedding(tmp_path):
    from train.export import consolidated_state_dict

    run = tmp_path / "finetuned"
    cfg = load_config("finetune_tiny")
    (run / "checkpoints" / "step00000003").mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    model = build_classifier(cfg.model.name, cfg.data.img_size, 8)
    trained = {key: value.clone() for key, value in model.state_dict().items()}
    # what fine-tuning learnt, far from sin-cos
    trained["pos_embed"] += torch.randn_like(trained["pos_embed"])
    folder = run / "checkpoints" / "step00000003"
    torch.save({"module": trained}, folder / "mp_rank_00_model_states.pt")  # ZeRO-0's layout, fp32
    mark_checkpoint(folder, step=3)
    exported, provenance = consolidated_state_dict(run)
    assert torch.equal(exported["pos_embed"], trained["pos_embed"])
    assert exported["head.weight"].shape == (8, 192) and provenance["config"]["task"] == "finetune"


def test_dali_rand_augment_draws_timms_magnitude_noise():
    """`mstd0.5`: each op's level is gauss(9, 0.5) clipped to [0, 10], as timm draws it, not 9 every
    time."""
    from dataclasses import replace

    from nvidia.dali import pipeline_def

    from pipeline.dali_rand_augment import BINS_PER_LEVEL, magnitude_bins

    def levels(augment) -> np.ndarray:
        @pipeline_def(batch_size=4000, num_threads=1, device_id=None, seed=5)
        def bins():
            return magnitude_bins(augment)

        pipe = bins()
        pipe.build()
        return np.array(pipe.run()[0].as_tensor()).ravel() / BINS_PER_LEVEL

    noisy = levels(FINETUNE)
    assert noisy.mean() == pytest.approx(9.0, abs=0.05) and noisy.std() == pytest.approx(
        0.5, abs=0.03
    )
    assert set(np.unique(levels(replace(FINETUNE, rand_augment_magnitude_std=0.0)))) == {9.0}
    clipped = levels(replace(FINETUNE, rand_augment_magnitude=10))
    # Half the draws above 10, clipped, and those within half a bin below it: P(level > 9.95) =
    # 0.54.
    assert clipped.max() == 10.0 and (clipped == 10.0).mean() == pytest.approx(0.54, abs=0.03)


def test_the_dali_graphs_rand_augment_applies_the_noisy_levels():
    """Grey images through one always-applied layer: with the noise, brightness alone gives each
    image its own shade; at a fixed level the 14 ops and their signs leave a handful of shades."""
    from dataclasses import replace

    from nvidia.dali import fn, pipeline_def, types

    from pipeline.dali_rand_augment import rand_augment

    grey = [np.full((32, 32, 3), 100, dtype=np.uint8)] * 2000

    def shades(std: float) -> int:
        @pipeline_def(
            batch_size=len(grey), num_threads=1, device_id=None, seed=3, enable_conditionals=True
        )
        def augmented():
            images = fn.external_source(
                source=lambda: grey, batch=True, layout="HWC", dtype=types.UINT8
            )
            policy = replace(
                FINETUNE,
                rand_augment_layers=1,
                rand_augment_prob=1.0,
                rand_augment_magnitude_std=std,
            )
            return rand_augment(images, policy)

        pipe = augmented()
        pipe.build()
        out = pipe.run()[0]
        return len({round(float(np.asarray(out[i]).mean()), 3) for i in range(len(grey))})

    assert shades(0.0) < 40 and shades(0.5) > 100
