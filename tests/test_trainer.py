"""The trainer's shape, on real parts without a training run: resources released on every path out
of set-up, the exit status of a refusal and of a bug, errors agreed across ranks, presets that
belong to their task, and periodic jobs named as themselves."""

import contextlib
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from model import build_mae
from model.vit import build_classifier
from model.weights import load_weights_file
from tests.helpers import REPO, start_job
from tests.runs import free_port, rank_env
from train import finetune, launch, pretrain
from train.checkpoint import estimated_checkpoint_bytes
from train.classifier_task import ClassifierTask, Top1Job
from train.config import load_config
from train.health import Watchdog
from train.mae_task import KnnJob, MaeTask, ReconstructionJob
from train.metrics import MetricsLog
from train.recipe import plan_batch
from train.run_folder import lock_folder
from train.task import PeriodicJob, RunContext, run_job
from train.trainer import Trainer


def assert_released(output) -> None:
    """Nothing of the run is left in this process: no watchdog thread, no process group, the
    folder's lock free."""
    assert not [t for t in threading.enumerate() if t.name == "maeflow-watchdog" and t.is_alive()]
    assert not dist.is_initialized()
    lock_folder(output).close()  # raises FolderInUse while the run's own handle is still open


def test_a_run_refused_inside_the_trainer_releases_everything_it_took(
    one_rank, shards, tmp_path, capsys
):
    output = tmp_path / "refused"
    argv = ["--config", "finetune_tiny", "--data", str(shards), "--output", str(output),
            "--set", "finetune.num_classes=3", "--set", "runtime.hang_timeout_s=600"]
    assert finetune.main(argv) == 2  # the shards label 4 classes: refused once the group is joined
    assert "finetune.num_classes is 3, but the train shards" in capsys.readouterr().err
    assert_released(output)
    assert not (output / "config.json").exists()  # refused before the folder was written


class TaskWithABug(MaeTask):
    """A third task, as a user writes one: a file with a Task subclass (here with a bug in it)."""

    name = "a task with a bug"

    def build_model(self, initialise: bool) -> torch.nn.Module:
        raise ValueError("shapes that cannot be: a bug, not the user's mistake")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a torch without CUDA is what this refuses")
def test_gpus_allocated_to_a_torch_without_cuda_are_refused_in_one_line(
    one_rank, shards, tmp_path, monkeypatch, capsys
):
    """A .venv installed on a login node (CPU torch) and a job given GPUs: refused, not trained on
    the CPU."""
    output = tmp_path / "refused"
    monkeypatch.setenv("SLURM_JOB_GPUS", "0,1")
    assert pretrain.main(["--config", "tiny", "--data", str(shards), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SLURM_JOB_GPUS=0,1 gives this rank GPUs" in err[0], err
    assert "a CPU build" in err[0] and "bash run.sh setup --cuda" in err[0]
    assert not output.exists()
    monkeypatch.delenv("SLURM_JOB_GPUS")
    # what the deepspeed launcher sets on a CPU machine too
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    from train.distributed import allocated_gpus
    assert allocated_gpus() is None


def test_a_bug_is_not_a_refusal_it_propagates_and_the_trainer_still_closes(
    one_rank, shards, tmp_path
):
    output = tmp_path / "bug"
    # uncaught: status 1 with the traceback
    with pytest.raises(ValueError, match="a bug, not the user's mistake"):
        launch.main(
            TaskWithABug, ["--config", "tiny", "--data", str(shards), "--output", str(output)]
        )
    assert_released(output)


def test_an_error_on_another_rank_keeps_its_type_and_names_the_rank():
    port = free_port()
    script = str(REPO / "tests" / "scripts" / "agree_ranks.py")
    env = {"PYTHONPATH": str(REPO)}
    ranks = [
        start_job([sys.executable, script], env={**rank_env(rank, 2, port), **env})
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=120)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs
    seen = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out in outs]
    message = "shard train-000003.tar is damaged"
    assert seen[1] == [
        {"type": "DataError", "message": message},
        {"type": "KeyError", "message": repr(message)},
    ]
    # a refusal on every rank: exit 2
    assert seen[0] == [{"type": "DataError", "message": f"rank 1: {message}"},
                       # a bug everywhere: exit 1
                       {"type": "KeyError", "message": repr(f"rank 1: {message!r}")}]


@pytest.mark.parametrize(
    "script, preset, right",
    [
        (pretrain, "finetune_vit_b16", "train/finetune.py"),
        (pretrain, "linprobe_vit_l16", "train/finetune.py"),
        (finetune, "vit_b16_1600ep", "train/pretrain.py"),
    ],
)
def test_a_preset_given_to_the_other_tasks_script_is_refused_naming_the_right_one(
    script, preset, right, capsys
):
    assert script.main(["--config", preset, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"preset: run it with {right}" in err and len(err.splitlines()) == 1, err


def test_each_task_config_holds_only_what_that_task_reads(capsys):
    assert (
        finetune.main(
            ["--config", "finetune_tiny", "--set", "model.mask_ratio=0.5", "--print-config"]
        )
        == 2
    )
    assert (
        "model.mask_ratio is a setting of MAE pre-training (train/pretrain.py)"
        in capsys.readouterr().err
    )
    assert (
        pretrain.main(["--config", "tiny", "--set", "finetune.mode=linear_probe", "--print-config"])
        == 2
    )
    assert (
        "finetune.mode is a setting of fine-tuning (train/finetune.py)" in capsys.readouterr().err
    )
    assert finetune.main(["--config", "finetune_tiny", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert (
        "finetune.layer_decay = 0.75" in printed
        and "mask_ratio" not in printed
        and "viz_every" not in printed
    )


def test_periodic_jobs_are_named_as_themselves_in_hang_reports(tmp_path):
    assert {job.name for job in (KnnJob, ReconstructionJob, Top1Job)} == {
        "k-NN evaluation", "reconstruction", "top-1 evaluation"}

    class Stuck(PeriodicJob):
        name = Top1Job.name

        def run(self, step: int, finished_epochs: int) -> None:
            # what the watchdog writes if the job hangs here
            self.report = watchdog.report().read_text()

    watchdog = Watchdog(0, tmp_path, 0, lambda: 7)
    job = Stuck(every_epochs=1)
    run_job(job, watchdog, step=7, finished_epochs=2)
    assert "no progress for" in job.report and "during top-1 evaluation" in job.report
    assert job.last_step == 7 and watchdog.phase is None


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def one_rank_context(cfg, resources: contextlib.ExitStack) -> RunContext:
    """What the trainer hands a task on one CPU rank (the process group: `one_rank_group`)."""
    return RunContext(
        cfg,
        torch.device("cpu"),
        0,
        1,
        plan_batch(cfg.optim, 1),
        torch.float32,
        dist.group.WORLD,
        MetricsLog(Path(cfg.output), True, False),
        print,
        resources,
    )


def test_fine_tuning_starts_from_the_pretrained_encoder_unless_a_checkpoint_follows(
    shards, tmp_path, one_rank_group
):
    torch.manual_seed(1)
    pretrained = build_mae("mae_vit_tiny_patch16", img_size=64)
    torch.save({"model": pretrained.state_dict()}, tmp_path / "encoder.pth")
    cfg = load_config("finetune_tiny", [f"data.shards={shards}", f"output={tmp_path}",
                                        f"model.init={tmp_path / 'encoder.pth'}"])
    with contextlib.ExitStack() as resources:
        task = ClassifierTask(one_rank_context(cfg, resources))
        started = task.build_model(initialise=True).state_dict()
        for key, value in pretrained.state_dict().items():
            if key in started and key != "pos_embed":  # the decoder and the mask token stay behind
                assert torch.equal(started[key], value), key
        torch.testing.assert_close(started["pos_embed"], pretrained.state_dict()["pos_embed"])
        # a resume: the checkpoint's weights follow
        fresh = task.build_model(initialise=False).state_dict()
        assert not torch.equal(
            fresh["blocks.0.attn.qkv.weight"], started["blocks.0.attn.qkv.weight"]
        )


def test_the_best_top1_so_far_is_the_jobs_state_so_best_pth_never_gets_worse(
    shards, tmp_path, one_rank_group
):
    cfg = load_config("finetune_tiny", [f"data.shards={shards}", f"output={tmp_path}"])
    with contextlib.ExitStack() as resources:
        ctx = one_rank_context(cfg, resources)
        torch.manual_seed(0)
        model = build_classifier(cfg.model.name, cfg.data.img_size, 4)
        job = Top1Job(ctx, model, model, ctx.loader("val", train=False))
        # a resumed run's best so far: better than any evaluation
        job.load_state_dict({"best_top1": 1.01})
        job.run(step=5, finished_epochs=1)
        assert not (tmp_path / "best.pth").exists() and job.state_dict() == {"best_top1": 1.01}
        job.load_state_dict({"best_top1": -1.0})
        job.run(step=6, finished_epochs=2)
        top1 = [
            json.loads(line)["top1"]
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        ]
        assert job.state_dict() == {"best_top1": top1[-1]} and (tmp_path / "best.pth").is_file()
        job.run(step=7, finished_epochs=3)  # the same weights: as good, not better
        assert load_weights_file(tmp_path / "best.pth")["maeflow"]["step"] == 6
        switched_on = Top1Job(ctx, model, model, ctx.loader("val", train=False))
        # a job the checkpoint holds nothing of (evaluation switched on since)
        switched_on.load_state_dict(None)
        assert switched_on.state_dict() == {"best_top1": -1.0}


def test_the_loop_never_waits_on_the_device_nor_on_the_other_ranks_between_log_steps(
    one_rank, tmp_path, monkeypatch
):
    """The real trainer, 12 steps on synthetic data, a log every 12: no accelerator synchronize(),
    no read of a device tensor's value, no reduction of one and no blocking collective of any kind
    in steps 1-11. What the loop sends between log steps: one vote per step (stop, checkpoint by the
    clock), an all-reduce issued without waiting and read at the next step."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils._python_dispatch import TorchDispatchMode

    # the interpreter is for the kernels' tests, not for the loop's
    monkeypatch.setenv("MAE_KERNELS", "torch")
    cfg = load_config(
        "tiny",
        [
            "data.backend=synthetic",
            "data.synthetic_samples=512",
            f"output={tmp_path / 'run'}",
            "max_steps=12",
            "log.log_every=12",
            "checkpoint.at_end=false",
            "eval.every_epochs=0",
            "log.tensorboard=false",
            "log.peak_tflops=0.5",
            "checkpoint.every_minutes=30",
        ],
    )
    waits: list[tuple[int, str]] = []
    accelerator = get_accelerator()
    synchronize = accelerator.synchronize

    def counted_synchronize(*args, **kwargs):
        waits.append((trainer.state.step, "synchronize"))
        return synchronize(*args, **kwargs)

    def counted(name: str, collective):
        def call(*args, **kwargs):
            waits.append(
                (
                    trainer.state.step,
                    f"{name}{' issued' if kwargs.get('async_op') else ' blocking'}",
                )
            )
            return collective(*args, **kwargs)
        return call

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._local_scalar_dense:
                waits.append((trainer.state.step, f"read {args[0].dtype}"))
            return func(*args, **(kwargs or {}))

    with Trainer(cfg, MaeTask, None) as trainer:
        monkeypatch.setattr(accelerator, "synchronize", counted_synchronize)
        for name in (
            "all_reduce",
            "all_gather",
            "all_gather_object",
            "broadcast",
            "broadcast_object_list",
            "barrier",
            "reduce",
            "gather_object",
        ):
            monkeypatch.setattr(dist, name, counted(name, getattr(dist, name)))
        with Reads():
            assert trainer.fit() == 0
    between_logs = [(step, event) for step, event in waits if 0 < step < 12]
    # No gradient all-reduce either: at one rank there is no peer to reduce with.
    assert between_logs == [(step, "all_reduce issued") for step in range(1, 12)], between_logs
    assert (12, "all_reduce blocking") in waits  # the log step reduces the window's loss
    # A card the table does not know (here the CPU) reports MFU against the peak its config names.
    (record,) = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert record["mfu"] == pytest.approx(
        trainer.monitor.flops_per_image * record["img_per_s"] / 0.5e12
    )


@pytest.mark.parametrize("accumulation", [1, 4])
def test_under_autocast_each_weight_is_cast_to_bf16_once_per_optimizer_step(
    one_rank, tmp_path, monkeypatch, accumulation
):
    """The real trainer under autocast, 3 optimizer steps of 1 and of 4 micro-steps: each weight's
    bf16 copy is made once per optimizer step (counted as aten._to_copy of a parameter), never once
    per micro-step, and every matmul weight has one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setenv("MAE_KERNELS", "torch")
    cfg = load_config(
        "tiny",
        [
            "data.backend=synthetic",
            "data.synthetic_samples=512",
            f"output={tmp_path / 'run'}",
            "max_steps=3",
            "checkpoint.at_end=false",
            "eval.every_epochs=0",
            "log.viz_every=100",
            "log.tensorboard=false",
            "runtime.precision=autocast_bf16",
            f"optim.grad_accum_steps={accumulation}",
        ],
    )
    casts: dict[tuple[int, str], int] = {}

    class WeightCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = (
                weights.get(args[0].data_ptr()) if func is torch.ops.aten._to_copy.default else None
            )
            if name is not None and kwargs.get("dtype") == torch.bfloat16:
                key = (trainer.state.step, name)
                casts[key] = casts.get(key, 0) + 1
            return func(*args, **kwargs)

    with Trainer(cfg, MaeTask, None) as trainer:
        assert trainer.plan.grad_accum_steps == accumulation
        weights = {p.data_ptr(): name for name, p in trainer.model.named_parameters()}
        with WeightCasts():
            assert trainer.fit() == 0
    twice = {key: count for key, count in casts.items() if count > 1}
    assert not twice, f"weights cast more than once in an optimizer step: {sorted(twice)[:4]}"
    matmul_weights = {
        name
        for name, module in trainer.model.named_modules()
        if isinstance(module, torch.nn.Linear)
        for name in (f"{name}.weight",)
    }
    for step in range(3):
        assert matmul_weights <= {name for s, name in casts if s == step}, step


@pytest.mark.parametrize("task, preset", [(MaeTask, "tiny"), (ClassifierTask, "finetune_tiny")])
def test_compiled_blocks_compile_in_the_first_step_only_and_give_the_eager_losses(
    one_rank, shards, tmp_path, monkeypatch, task, preset
):
    """The real trainer, eager then compiled, one epoch and its evaluation (k-NN or top-1) and, in
    pre-training, a
    reconstruction: after the first optimizer step nothing recompiles (dynamo refuses to), no graph
    breaks, no fallback to eager, and every step's loss is eager's."""
    import torch._dynamo as dynamo

    monkeypatch.setenv("MAE_KERNELS", "torch")
    losses = []
    for compiled in (False, True):
        output = tmp_path / f"compiled_{compiled}"
        cfg = load_config(
            preset,
            [
                f"data.shards={shards}",
                f"output={output}",
                "max_steps=4",
                "log.log_every=1",
                "eval.every_epochs=1",
                "log.tensorboard=false",
                "checkpoint.at_end=false",
                f"runtime.compile={str(compiled).lower()}",
                "runtime.compile_backend=aot_eager",
            ],
        )
        dynamo.reset()
        dynamo.utils.counters.clear()
        with Trainer(cfg, task, None) as trainer, contextlib.ExitStack() as after_the_first_step:
            first_step = trainer.after_optimizer_step

            def then_no_recompile(epoch_done: bool, first_step=first_step):
                if trainer.state.step == 0:  # the first step is done
                    after_the_first_step.enter_context(dynamo.config.patch(error_on_recompile=True))
                return first_step(epoch_done)

            monkeypatch.setattr(trainer, "after_optimizer_step", then_no_recompile)
            assert trainer.fit() == 0
            assert compiled == (trainer.model.training_graphs is not None)
            assert not compiled or trainer.model.training_graphs.failure is None
        assert not dynamo.utils.counters["graph_break"]
        assert compiled == bool(dynamo.utils.counters["stats"]["unique_graphs"])
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        # the evaluation ran
        assert any(key in r for r in records for key in ("knn_top1_cls", "top1"))
        losses.append(
            [r["loss"] for r in records if "loss" in r and "step" in r and "top1" not in r]
        )
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_two_ranks_train_on_the_mean_of_their_gradients_and_log_the_mean_of_their_losses():
    """Two gloo ranks whose gradients and losses are 1x and 2x a common value: each keeps 1.5x the
    gradient (fp32 and bf16 buckets), and the logged loss is 1.5, not a rank's own or the sum; a
    loss non-finite on one rank is every rank's divergence, and so is a stop one rank saw."""
    port = free_port()
    script = str(REPO / "tests" / "scripts" / "mean_over_ranks.py")
    ranks = [start_job([sys.executable, script],
                       env={**rank_env(rank, 2, port), "PYTHONPATH": str(REPO)}) for rank in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], [out[-3000:] for out in outs]
    (first, second) = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert first == second
    # d(sum of W x + b)/dW = x, x = (rank + 1) on each input; d/db = 1 on both ranks
    mean = [[1.5] * 6, [1.0, 1.0]]
    assert first["grads"] == {"torch.float32": mean, "torch.bfloat16": mean}
    assert first["unused"] == [0.0, 0.0]  # zero gradients where no backward pass reached
    assert (first["loss"], first["bad_step"]) == (1.5, None)
    # one rank's loss non-finite from step 3: every rank stops there
    assert first["diverged_at"] == 3
    # a stop one rank saw: nothing decided at the step it was cast, a stop on both at the next
    assert first["decided"] == [[False, False], [True, False]]


def test_the_logged_gradient_norm_is_the_l2_norm_over_every_parameter():
    from train.trainer import total_grad_norm

    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    model.bias.grad = torch.tensor([0.0, 4.0])
    assert total_grad_norm(model).item() == 5.0
    model.bias.grad = None  # a parameter the step did not reach
    assert total_grad_norm(model).item() == 3.0


def test_with_peers_the_gradients_leave_in_bf16_buckets_while_the_backward_pass_runs(tmp_path):
    """Two gloo ranks of the real trainer under autocast_bf16, 3 optimizer steps of 2 micro-steps, 1
    MB buckets. In every optimizer step each trainable parameter's gradient is all-reduced exactly
    once, in bf16 (half of fp32's bytes) and in several buckets; nothing in the first micro-step,
    which only accumulates; and the first bucket leaves while the last micro-step's backward pass
    still has operators to run."""
    port = free_port()
    script = str(REPO / "tests" / "scripts" / "reduction_ranks.py")
    ranks = [start_job([sys.executable, script, str(tmp_path / "run"), "autocast_bf16"],
                       env={**rank_env(rank, 2, port), "PYTHONPATH": str(REPO)}) for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], [out[-3000:] for out in outs]
    for out in outs:
        counted = json.loads(out.strip().splitlines()[-1])
        assert len(counted["steps"]) == 3
        for step in counted["steps"]:
            assert {dtype for dtype, _ in step["reduced"]} == {"torch.bfloat16"}
            assert sum(elements for _, elements in step["reduced"]) == counted["parameters"]
            assert len(step["reduced"]) > 2
            assert step["first_sent_in_micro_step"] == 1
            # the backward pass went on after the first bucket left
            assert step["ops_after_first_send"] > 50, step


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file (offline mode), read as W&B's own sync reads them: a header,
    then 32 KiB blocks of chunks (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last) holding
    its protobuf records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, records, pending = run_file.read_bytes(), [], b""
    assert data[:4] == b":W&B", run_file
    position = 7
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_a_run_logs_to_weights_and_biases_offline_and_its_resume_continues_the_same_wandb_run(
    one_rank, tmp_path, monkeypatch
):
    """log.wandb_project: the W&B run gets the run's config and every logged window's figures at its
    step, and the reconstruction; a resume goes on in the same W&B run (its id kept in the output
    folder)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "run"
    argv = [
        "--config",
        "tiny",
        "--output",
        str(output),
        "--log-every",
        "2",
        "--set",
        "data.backend=synthetic",
        "--set",
        "data.synthetic_samples=256",
        "--set",
        "eval.every_epochs=0",
        "--set",
        "log.tensorboard=false",
        "--set",
        "log.wandb_project=maeflow-test",
        "--set",
        "checkpoint.every_steps=4",
    ]
    assert pretrain.main([*argv, "--max-steps", "4"]) == 0
    assert pretrain.main([*argv, "--max-steps", "6", "--resume"]) == 0
    run_id = (output / "wandb_run_id").read_text().strip()
    runs = sorted((output / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    # one W&B run, written twice
    assert len(runs) == 2, sorted(p.name for p in (output / "wandb").iterdir())
    logged = {}
    for run_file in runs:
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config = {item.key: item.value_json for item in record.run.config.update}
                assert json.loads(config["model"])["name"] == "mae_vit_tiny_patch16"
                assert json.loads(config["log"])["wandb_project"] == "maeflow-test"
            if kind == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                logged.setdefault(items["_step"], set()).update(items)
    assert {2, 4, 6} <= set(logged) and all(
        {"loss", "lr", "grad_norm"} <= logged[step] for step in (2, 4, 6)
    ), logged
    assert any("reconstruction" in name for keys in logged.values() for name in keys), logged


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB file system of its own (tmpfs), for a run that fills it; skipped where mounting is
    not allowed."""
    import subprocess

    mount = tmp_path / "small_disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)]
    if shutil.which("mount") is None or subprocess.run(command, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_checkpoint_with_no_room_is_refused_in_one_line_and_the_last_one_resumes(
    one_rank, small_disk, capsys
):
    """The tiny MAE's checkpoint is 29.5 MB: on a 48 MB disk the first fits and the second does not.
    The run stops at it (exit 5) naming the folder, the room it needs and the free space; nothing of
    it is left half-written, and the run resumes from the first."""
    output = small_disk / "run"
    argv = [
        "--config",
        "tiny",
        "--output",
        str(output),
        "--set",
        "data.backend=synthetic",
        "--set",
        "data.synthetic_samples=512",
        "--set",
        "checkpoint.every_steps=2",
        "--set",
        "eval.every_epochs=0",
        "--set",
        "log.viz_every=100",
        "--set",
        "log.tensorboard=false",
    ]
    assert pretrain.main([*argv, "--max-steps", "6"]) == 5
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "checkpoint" in line and "GB free" in line]
    assert f"checkpoint {output / 'checkpoints' / 'step00000004'} needs about 0.03 GB" in line, line
    assert "the last checkpoint (step00000002) is intact" in line
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["latest", "step00000002"]
    written = sum(f.stat().st_size for f in (output / "checkpoints" / "step00000002").rglob("*"))
    with torch.device("meta"):  # --print-config's estimate, from the shapes alone
        estimate = estimated_checkpoint_bytes(
            MaeTask.model_shape(load_config("tiny", [], task=MaeTask))
        )
    assert abs(estimate - written) < 0.03 * written, (estimate, written)
    # Resumable from it (here to a step that writes no checkpoint, the disk being as full as it
    # was).
    assert (
        pretrain.main([*argv, "--max-steps", "3", "--resume", "--set", "checkpoint.at_end=false"])
        == 0
    ), capsys.readouterr().err[-2000:]
    resumed = [
        json.loads(line)
        for line in (output / "metrics.jsonl").read_text().splitlines()
        if "resumed" in line
    ]
    assert resumed[-1]["from"] == "step00000002"
