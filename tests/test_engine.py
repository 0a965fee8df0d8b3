"""What the trainer asks of DeepSpeed and torch: the merged DeepSpeed config, compiled blocks."""

import json

import pytest
import torch

from tests.helpers import tiny_preset_model
from train.config import ConfigError, load_config
from train.engine import compile_blocks, deepspeed_config
from train.recipe import plan_batch


def test_a_users_deepspeed_json_is_merged_and_may_not_contradict_the_config(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7, "overlap_comm": True},
                                "comms_logger": {"enabled": True}}))
    cfg = load_config("configs/tiny.toml", [f"runtime.deepspeed_config={user}", "runtime.zero_stage=2"])
    merged = deepspeed_config(cfg, plan_batch(cfg.optim, 2))
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5e7, "overlap_comm": True}
    assert merged["comms_logger"] == {"enabled": True} and merged["train_batch_size"] == 16
    for clash, message in (({"train_batch_size": 32}, "set optim.global_batch_size instead"),
                           ({"zero_optimization": {"stage": 3}}, "set runtime.zero_stage"),
                           ({"optimizer": {"type": "Adam"}}, "maeflow builds a fused torch AdamW")):
        user.write_text(json.dumps(clash))
        with pytest.raises(ConfigError, match=message):
            deepspeed_config(cfg, plan_batch(cfg.optim, 2))
    user.write_text("{not json")
    with pytest.raises(ConfigError, match=r"runtime.deepspeed_config .*ds\.json"):
        deepspeed_config(cfg, plan_batch(cfg.optim, 2))


@pytest.mark.parametrize("precision, key", [("bf16", "bf16"), ("autocast_bf16", "torch_autocast"), ("fp32", None)])
def test_precision_maps_to_one_deepspeed_switch(precision, key):
    cfg = load_config("configs/tiny.toml", [f"runtime.precision={precision}"])
    ds = deepspeed_config(cfg, plan_batch(cfg.optim, 1))
    switches = {k for k in ("bf16", "fp16", "torch_autocast") if k in ds}
    assert switches == ({key} if key else set())
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed's own default clips at 1.0


def test_compiled_blocks_keep_names_and_results():
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tiny_preset_model()
        if compiled:
            compile_blocks(model)
        loss, _, _ = model(imgs, noise=noise)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad},
                        list(model.state_dict())))
    assert results[0][2] == results[1][2]  # checkpoints and exports see the same parameter names
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
