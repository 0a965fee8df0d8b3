"""What a node must have before a run spends its time there (`train.preflight`): real Triton
launches (the CPU interpreter here, the compiler on a GPU), real DALI pipelines, the trainer's start
on one rank."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from train import launch, pretrain
from train.config import load_config
from train.distributed import free_port
from train.mae_task import MaeTask
from train.preflight import PreflightError, check_loader, dali_failure, kernel_choice
from train.trainer import Trainer


@pytest.fixture
def one_rank(one_rank, monkeypatch):
    """conftest's, with the kernels the config chooses, as a user's run has them."""
    monkeypatch.delenv("MAE_KERNELS", raising=False)  # the config's choice, as a user's run has it


def synthetic_run(tmp_path, *overrides: str):
    return load_config(
        "tiny",
        [
            "data.backend=synthetic",
            "data.synthetic_samples=64",
            f"output={tmp_path / 'run'}",
            "max_steps=2",
            "eval.every_epochs=0",
            "log.tensorboard=false",
            *overrides,
        ],
    )


def test_triton_failing_on_a_node_costs_that_node_the_kernels_never_the_run(
    one_rank, tmp_path, capsys
):
    """bf16 kernels under the CPU interpreter (numpy has no bfloat16) fail as a GPU node without a
    compiler does: the tiny kernel's launch gives a wrong answer or an error. One line names the
    rank and the cause, the kernels' references run, the run finishes."""
    # conftest: the interpreter is this machine's Triton
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with Trainer(synthetic_run(tmp_path, "runtime.precision=bf16"), MaeTask, None) as trainer:
        assert trainer.model.kernels == "torch"
        assert trainer.fit() == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "Triton cannot run" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "rank 0: Triton cannot run on cpu in torch.bfloat16"
    ), lines
    assert "build-essential python3-dev" in lines[0]


def test_kernels_that_run_stay_on_and_a_run_that_insists_on_triton_where_it_fails_is_refused(
    one_rank, tmp_path, capsys
):
    with Trainer(synthetic_run(tmp_path / "fp32", "max_steps=1"), MaeTask, None) as trainer:
        assert trainer.model.kernels == "auto"  # fp32 runs in the interpreter: the kernels train
        assert trainer.fit() == 0
    argv = [
        "--config",
        "tiny",
        "--set",
        "data.backend=synthetic",
        "--output",
        str(tmp_path / "insisted"),
        "--set",
        "runtime.precision=bf16",
        "--set",
        "runtime.kernels=triton",
    ]
    assert launch.main(MaeTask, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: runtime.kernels=triton, but Triton cannot run on cpu"
    ), err
    assert not (tmp_path / "insisted" / "config.json").exists()


def test_the_kernel_choice_follows_the_config_and_the_override(monkeypatch):
    monkeypatch.delenv("MAE_KERNELS", raising=False)
    assert kernel_choice(torch.device("cpu"), torch.float32, "torch") == ("torch", None)
    choice, line = kernel_choice(torch.device("cpu"), torch.bfloat16, "auto")
    assert choice == "torch" and "Triton cannot run on cpu" in line
    # tests' and benchmarks' override: no launch, no line
    monkeypatch.setenv("MAE_KERNELS", "torch")
    assert kernel_choice(torch.device("cpu"), torch.bfloat16, "triton") == ("torch", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("MAE_KERNELS")
    # the references, silently
    assert kernel_choice(torch.device("cpu"), torch.bfloat16, "auto") == ("auto", None)


def test_dali_that_cannot_decode_on_the_ranks_device_refuses_naming_the_build_to_install():
    assert dali_failure(torch.device("cpu")) is None
    check_loader(torch.device("cpu"), "dali")
    if torch.cuda.is_available():
        pytest.skip("this machine's GPU decodes")
    with pytest.raises(
        PreflightError,
        match=r"DALI cannot decode on cuda:0 \(.+\): install the DALI built for "
        r"this node's driver",
    ):
        check_loader(torch.device("cuda", 0), "dali")
    check_loader(torch.device("cuda", 0), "pil")  # another loader: DALI is not asked


def test_the_command_line_preflight_names_what_is_missing():
    done = subprocess.run(
        [sys.executable, "-m", "train.preflight", "--device", "cpu", "--dtype", "float32"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert done.returncode == 0 and "Triton kernels ok, DALI decoding ok" in done.stdout, (
        done.stdout + done.stderr
    )
    # not importable
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['webdataset'] = None; "
                           "from train.preflight import main; sys.exit(main(['--device', 'cpu']))"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "missing: webdataset" in done.stdout, done.stdout + done.stderr


@pytest.mark.gpu
def test_a_gpu_node_without_a_c_compiler_trains_with_the_references(tmp_path):
    """Triton builds its C launcher at its first launch on a GPU: with no compiler (CC names none,
    an empty cache), the run says so once and trains with the kernels' torch references."""
    env = {
        **os.environ,
        "CC": "/bin/false",
        "TRITON_CACHE_DIR": str(tmp_path / "triton"),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    env.pop("MAE_KERNELS", None)
    done = subprocess.run(
        [
            sys.executable,
            str(pretrain.__file__),
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
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.count("Triton cannot run on cuda:0") == 1, done.stderr[-3000:]
