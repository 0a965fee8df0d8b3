"""What the trainer asks of DeepSpeed and torch: the merged DeepSpeed config, compiled blocks."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, tiny_preset_model
from train.config import ConfigError, load_config
from train.distributed import free_port
from train.engine import deepspeed_config, engine_args
from train.recipe import plan_batch


def test_a_users_deepspeed_json_is_merged_and_may_not_contradict_the_config(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {"reduce_bucket_size": 5e7, "overlap_comm": True},
                "comms_logger": {"enabled": True},
            }
        )
    )
    cfg = load_config(
        "configs/tiny.toml", [f"runtime.deepspeed_config={user}", "runtime.zero_stage=2"]
    )
    merged = deepspeed_config(cfg, plan_batch(cfg.optim, 2))
    assert merged["zero_optimization"] == {
        "stage": 2,
        "reduce_bucket_size": 5e7,
        "overlap_comm": True,
    }
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


@pytest.mark.parametrize(
    "precision, key", [("bf16", "bf16"), ("autocast_bf16", "torch_autocast"), ("fp32", None)]
)
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
            model.compile_blocks()
        loss, _, _ = model(imgs, noise=noise)
        loss.backward()
        results.append(
            (
                loss.detach(),
                {k: p.grad for k, p in model.named_parameters() if p.requires_grad},
                list(model.state_dict()),
            )
        )
    assert results[0][2] == results[1][2]  # checkpoints and exports see the same parameter names
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def saved_activation_bytes(step) -> int:
    """Bytes autograd keeps from the forward of `step()` for its backward (weights aside)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(tensor, torch.nn.Parameter):
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def test_the_classifier_compiles_and_recomputes_through_the_config_switches_with_eager_results():
    """runtime.compile and model.activation_recompute in fine-tuning (drop path on): the eager
    step's loss and gradients, less activation memory, no graph break."""
    import torch._dynamo as dynamo

    from model.vit import build_classifier
    from train.engine import apply_model_switches

    images = torch.randn(4, 3, 64, 64)
    results = []
    for switches in ([], ["runtime.compile=true", "model.activation_recompute=true"]):
        cfg = load_config("finetune_tiny", switches)
        torch.manual_seed(0)
        model = build_classifier(cfg.model.name, cfg.data.img_size, 8, drop_path_rate=0.1)
        model.set_drop_path_generator(torch.Generator().manual_seed(3))
        apply_model_switches(model, cfg)
        assert model.grad_checkpointing == cfg.model.activation_recompute
        dynamo.reset()
        dynamo.utils.counters.clear()

        def step(model=model) -> torch.Tensor:
            loss = model(images).logsumexp(1).mean()
            loss.backward()
            return loss

        saved = saved_activation_bytes(step)
        loss = step()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()], saved))
        assert not dynamo.utils.counters["graph_break"]
    (eager_loss, eager_grads, eager_saved), (loss, grads, saved) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert saved < 0.5 * eager_saved, (saved, eager_saved)  # the blocks kept only their inputs


def test_a_compiler_failing_on_a_node_costs_that_node_speed_never_the_run():
    """A backend that fails as a node without its compiler does: one line naming the cause, every
    block eager, the eager loss and gradients; and a backend torch does not know is refused before
    any work."""
    import torch._dynamo as dynamo

    from train.engine import apply_model_switches

    def no_compiler_here(graph, example_inputs):
        raise RuntimeError("no C++ compiler found on this node")

    if "maeflow_test_broken" not in dynamo.list_backends(exclude_tags=()):
        dynamo.register_backend(no_compiler_here, name="maeflow_test_broken")
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    results, lines = [], []
    for switches in ([], ["runtime.compile=true", "runtime.compile_backend=maeflow_test_broken"]):
        torch.manual_seed(0)
        model = tiny_preset_model()
        apply_model_switches(model, load_config("configs/tiny.toml", switches), lines.append)
        for _ in range(2):
            model.zero_grad()
            loss, _, _ = model(imgs, noise=noise)
            loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert (
        len(lines) == 1
        and "every block runs eager" in lines[0]
        and "no C++ compiler found" in lines[0]
    ), lines
    torch.testing.assert_close(results[1][0], results[0][0])
    for compiled, eager in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(compiled, eager)
    with pytest.raises(
        ConfigError, match=r"runtime.compile_backend 'inductr' is not one of .*inductor"
    ):
        load_config(
            "configs/tiny.toml", ["runtime.compile=true", "runtime.compile_backend=inductr"]
        )


def test_deepspeed_is_handed_the_device_maeflow_chose_not_its_local_ranks(monkeypatch):
    """Per-task GPU binding (srun --gpus-per-task=1): the task of local rank 1 sees one GPU, its
    cuda:0. DeepSpeed left to itself takes LOCAL_RANK's device, cuda:1, which does not exist
    there."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert engine_args(torch.device("cuda", 0)).device_rank == 0
    assert engine_args(torch.device("cuda", 3)).device_rank == 3
    # DeepSpeed's CPU accelerator has no devices to pick
    assert engine_args(torch.device("cpu")).device_rank == 1


@pytest.mark.gpu
def test_a_rank_bound_to_one_gpu_with_local_rank_1_trains_on_it(tmp_path):
    """Per-task binding simulated: local rank 1 of 2 on its node, one visible device. The run
    trains, and every record of where it ran names cuda:0."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    done = subprocess.run(
        [
            sys.executable,
            "train/pretrain.py",
            "--config",
            "tiny",
            "--set",
            "data.backend=synthetic",
            "--set",
            "data.synthetic_samples=64",
            "--output",
            str(tmp_path / "run"),
            "--max-steps",
            "2",
            "--set",
            "eval.every_epochs=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    started = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"started"' in line
    ]
    assert (
        started[0]["ranks"][0]["device"] == "cuda:0" and started[0]["ranks"][0]["local_rank"] == 1
    )
