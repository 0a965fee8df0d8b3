"""The recipe: how the global batch splits, the lr schedule, and the optimizer's decay groups."""

import dataclasses
import itertools
import math

import pytest

from tests.helpers import tiny_preset_model
from train.config import ConfigError, OptimConfig, load_config
from train.mae_task import PretrainConfig
from train.recipe import build_optimizer, lr_at, peak_lr, plan_batch


def test_batch_plan_derives_the_missing_number():
    assert plan_batch(OptimConfig(global_batch_size=4096), 64).local_batch_size == 64
    plan = plan_batch(OptimConfig(global_batch_size=4096, local_batch_size=32), 64)
    assert (plan.grad_accum_steps, plan.global_batch_size) == (2, 4096)
    assert (
        plan_batch(OptimConfig(global_batch_size=4096, grad_accum_steps=4), 8).local_batch_size
        == 128
    )
    with pytest.raises(ConfigError, match="does not split evenly over 3 ranks"):
        plan_batch(OptimConfig(global_batch_size=4096), 3)
    # A memory limit: the fewest accumulation steps that keep the local batch within it.
    limited = OptimConfig(global_batch_size=4096, max_local_batch_size=128)
    assert [
        (p.local_batch_size, p.grad_accum_steps)
        for p in (plan_batch(limited, w) for w in (1, 8, 64))
    ] == [(128, 32), (128, 4), (64, 1)]
    assert (
        plan_batch(OptimConfig(global_batch_size=96, max_local_batch_size=40), 1).local_batch_size
        == 32
    )


@pytest.mark.parametrize("ranks", [1, 4, 16])
def test_a_batch_plan_with_both_numbers_given_is_checked_against_the_rank_count(ranks):
    consistent = OptimConfig(global_batch_size=64 * ranks, local_batch_size=16, grad_accum_steps=4)
    plan = plan_batch(consistent, ranks)
    assert (plan.local_batch_size, plan.grad_accum_steps, plan.global_batch_size) == (
        16,
        4,
        64 * ranks,
    )
    assert plan.note == "as configured"
    for wrong in (
        OptimConfig(global_batch_size=64 * ranks, local_batch_size=16, grad_accum_steps=2),
        OptimConfig(global_batch_size=64 * ranks + 64, local_batch_size=16, grad_accum_steps=4),
    ):
        with pytest.raises(
            ConfigError,
            match=f"!= local_batch_size 16 x grad_accum_steps {wrong.grad_accum_steps} "
            f"x {ranks} ranks",
        ):
            plan_batch(wrong, ranks)


def test_learning_rate_schedule():
    cfg = PretrainConfig().optim
    peak = 1.5e-4 * 4096 / 256
    assert lr_at(0, peak, cfg) == 0 and lr_at(20, peak, cfg) == pytest.approx(peak / 2)
    assert lr_at(40, peak, cfg) == pytest.approx(peak)
    assert lr_at(820, peak, cfg) == pytest.approx(peak / 2)
    assert lr_at(1600, peak, cfg) == pytest.approx(0, abs=1e-12)


def test_the_schedule_with_a_floor_is_continuous_and_ends_at_min_lr():
    optim = OptimConfig(warmup_epochs=5, epochs=100, min_lr=1e-5)
    peak = 1e-3
    # warm-up meets the cosine at its top
    assert lr_at(5 - 1e-9, peak, optim) == pytest.approx(peak, rel=1e-6)
    assert lr_at(5, peak, optim) == pytest.approx(peak)
    # half-way down: the mean of peak and floor
    assert lr_at(52.5, peak, optim) == pytest.approx((peak + 1e-5) / 2)
    assert lr_at(100, peak, optim) == pytest.approx(1e-5) and lr_at(
        150, peak, optim
    ) == pytest.approx(1e-5)
    values = [lr_at(e / 10, peak, optim) for e in range(50, 1001)]
    assert all(a >= b for a, b in itertools.pairwise(values)) and min(values) >= 1e-5


def test_peak_lr_is_the_linear_scaling_rule_unless_set():
    assert peak_lr(OptimConfig(blr=1.5e-4), 4096) == pytest.approx(2.4e-3)
    assert peak_lr(OptimConfig(blr=1.5e-4), 1024) == pytest.approx(6e-4)
    assert peak_lr(OptimConfig(blr=1.5e-4, lr=0.01), 4096) == 0.01
    assert math.isclose(peak_lr(load_config("configs/vit_b16_1600ep.toml").optim, 4096), 2.4e-3)


def test_the_optimizer_decays_weights_but_not_biases_and_norms():
    """The recipe's groups, on the optimizer the trainer builds (the one DeepSpeed then wraps)."""
    cfg = load_config("configs/tiny.toml")
    model = tiny_preset_model()
    optimizer = build_optimizer(model, cfg.optim, 1e-3)
    decay_of = {
        id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]
    }
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # every trained parameter once, the frozen position embeddings not at all
    assert len(decay_of) == len(trained)
    for name, param in trained.items():
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        assert decay_of[id(param)] == (0.0 if no_decay else cfg.optim.weight_decay), name
    assert (
        decay_of[id(model.blocks[0].norm1.weight)] == 0.0
        and decay_of[id(model.blocks[0].attn.qkv.bias)] == 0.0
    )
    assert decay_of[id(model.blocks[0].attn.qkv.weight)] == cfg.optim.weight_decay
    # [1, 1, D]: decayed, as in the reference
    assert decay_of[id(model.cls_token)] == cfg.optim.weight_decay
    assert optimizer.defaults["betas"] == cfg.optim.betas and optimizer.defaults["fused"]


def test_the_schedule_counts_samples_so_a_batch_change_keeps_its_place_and_its_end():
    from train.recipe import Schedule

    optim = load_config("configs/tiny.toml").optim
    before = Schedule.of(64, plan_batch(optim, 2), epochs=40)  # 4 steps of 16 an epoch
    # = step / steps per epoch
    assert [before.progress(16 * step) for step in (0, 3, 10)] == [0, 0.75, 2.5]
    assert before.steps_left(0, 16) == 160
    halved = Schedule.of(
        64, plan_batch(dataclasses.replace(optim, global_batch_size=8), 2), epochs=40
    )
    # 10 steps of 16 done: epoch 2.5 either way
    assert halved.progress(160) == before.progress(160) == 2.5
    # the run still ends after 40 epochs of samples
    assert 10 + halved.steps_left(160, 8) == 10 + 300
    # a batch that does not divide what is left: the last, partial step is taken (343 x 7 >= 2400)
    assert halved.steps_left(160, 7) == 343
