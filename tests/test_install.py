"""Setting maeflow up where the jobs run, as a user does: `bash run.sh wheels` on a connected
machine, then `bash run.sh setup --offline` in a fresh checkout with every index and the network out
of reach, on the wheelhouse's torch or around a torch the node's interpreter already has."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "install"))
from wheelhouse import prune


def checkout_copy(dest: Path) -> Path:
    """A fresh checkout of this working tree (tracked and untracked files, nothing ignored: no
    .venv)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def no_network(cmd: list[str]) -> list[str]:
    """`cmd` in a network namespace of its own (loopback only: the ranks' rendezvous), where this
    machine lets a test make one; elsewhere with every proxy pointing nowhere."""
    if (
        shutil.which("unshare")
        and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    ):
        return ["unshare", "-n", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh", *cmd]
    return cmd


def offline_env(**extra: str) -> dict[str, str]:
    """No pip configuration (this machine's names local indexes and wheel folders) and no way
    out."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "VIRTUAL_ENV", "MAE_KERNELS"))
    }
    dead = "http://127.0.0.1:9"
    return {
        **env,
        "PIP_CONFIG_FILE": os.devnull,
        "http_proxy": dead,
        "https_proxy": dead,
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        **extra,
    }


def run_sh(
    checkout: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        no_network(["bash", "run.sh", *args]),
        cwd=checkout,
        env=env or offline_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


def fake_wheel(folder: Path, name: str, *requires: str) -> None:
    """A wheel with only its METADATA: what pruning reads."""
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
        lines = [f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]
        wheel.writestr(
            f"{name}-1.0.dist-info/METADATA", "Metadata-Version: 2.1\n" + "\n".join(lines) + "\n"
        )


def test_a_wheelhouse_without_torch_keeps_what_else_needs_and_drops_what_only_torch_needs(tmp_path):
    fake_wheel(
        tmp_path, "torch", "sympy", "filelock", "nvidia-cublas-cu12; platform_system == 'Linux'"
    )
    fake_wheel(tmp_path, "deepspeed", "torch", "hjson", "psutil")
    fake_wheel(tmp_path, "huggingface_hub", "filelock", "tqdm[notebook]")
    fake_wheel(
        tmp_path,
        "tqdm",
        "ipywidgets; extra == 'notebook'",
        "colorama; platform_system == 'Windows'",
    )
    for name in (
        "sympy",
        "filelock",
        "nvidia_cublas_cu12",
        "hjson",
        "psutil",
        "ipywidgets",
        "colorama",
        "tomli",
        "stray",
    ):
        fake_wheel(tmp_path, name)
    roots = [
        "deepspeed>=0.16",
        "huggingface-hub",
        "tomli>=2; python_version < '3.11'",
        "torch==2.13.0+cpu",
    ]
    removed = prune(tmp_path, roots, "3.12", {"torch"})
    assert sorted(p.name.split("-")[0] for p in removed) == [
        "colorama",
        "nvidia_cublas_cu12",
        "stray",
        "sympy",
        "tomli",
        "torch",
    ]
    left = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.whl"))
    assert left == [
        "deepspeed",
        "filelock",
        "hjson",
        "huggingface_hub",
        "ipywidgets",
        "psutil",
        "tqdm",
    ]
    assert not prune(tmp_path, [*roots, "tomli"], "3.10", {"torch"})  # nothing more to drop


def test_setup_around_a_system_torch_refuses_what_cannot_run_the_jobs_in_one_line(tmp_path):
    """A torch older than maeflow's minimum, a CPU build where the jobs get GPUs, a wheelhouse
    without torch and no torch to keep: each refused in one line, exit 2."""
    checkout = checkout_copy(tmp_path / "checkout")
    old = tmp_path / "old_torch"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(old)], check=True)
    site = subprocess.run(
        [
            str(old / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "torch").mkdir(parents=True)  # what an old container's torch says of itself
    Path(site, "torch", "__init__.py").write_text(
        "__version__ = '2.1.2+cu118'\nclass version:\n    cuda = '11.8'\n"
    )
    empty = tmp_path / "wheelhouse"
    empty.mkdir()
    cases = [
        (
            ["--system-torch", "--python", str(old / "bin" / "python")],
            {},
            f"--system-torch: {old / 'bin' / 'python'} has torch 2.1.2, and maeflow needs torch >= "
            "2.4",
        ),
        (
            ["--system-torch", "--python", sys.executable],
            {"SLURM_JOB_GPUS": "0,1"},
            "a CPU build, and the jobs here get GPUs",
        ),
        ([], {}, f"the wheelhouse {empty} has no torch (made with --no-torch): add --system-torch"),
    ]
    for args, env, expected in cases:
        done = run_sh(
            checkout, "setup", "--offline", str(empty), "--cpu", *args, env=offline_env(**env)
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], (
            done.stdout + done.stderr
        )
        assert not (checkout / ".venv" / ".maeflow-setup").exists()


@pytest.mark.slow
def test_a_wheelhouse_sets_up_fresh_checkouts_offline_on_its_torch_or_the_nodes_and_they_train(
        tmp_path, shards):
    """The README's "On a GPU node without network", on this machine's CPU: `run.sh wheels` here,
    then two fresh checkouts set up from the wheelhouse alone (no index, no network): one on the
    wheelhouse's torch, one around a torch that the node's interpreter (itself a virtual
    environment, as in some containers) already has. Each trains a few steps on real shards, with
    DALI."""
    wheelhouse = tmp_path / "wheelhouse"
    made = subprocess.run(
        ["bash", "run.sh", "wheels", str(wheelhouse), "--cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert list(wheelhouse.glob("deepspeed-*-py3-none-any.whl")) and list(
        wheelhouse.glob("nvidia_dali_cuda120-*")
    )
    # wheels only
    assert not list(wheelhouse.glob("*.tar.gz")) and not list(wheelhouse.glob("*.zip"))

    # a container's interpreter: a venv holding torch and nothing of maeflow's
    node = tmp_path / "node_python"
    subprocess.run([sys.executable, "-m", "venv", str(node)], check=True)
    subprocess.run(
        no_network(
            [
                str(node / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--find-links",
                str(wheelhouse),
                "torch==2.13.0",
            ]
        ),
        env=offline_env(),
        check=True,
    )
    checkouts = {"wheelhouse torch": (checkout_copy(tmp_path / "a"), ["--cpu"]),
                 "node's torch": (checkout_copy(tmp_path / "b"), ["--system-torch", "--python",
                                                                   str(node / "bin" / "python")])}
    for what, (checkout, options) in checkouts.items():
        done = run_sh(checkout, "setup", "--offline", str(wheelhouse), *options)
        assert done.returncode == 0, f"{what}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        python = checkout / ".venv" / "bin" / "python"
        torch_at = (
            subprocess.run(
                [str(python), "-c", "import torch, nvidia.dali, deepspeed; print(torch.__file__)"],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        assert torch_at.startswith(str(node if what == "node's torch" else checkout)), (
            what,
            torch_at,
        )
        steps = subprocess.run(
            no_network(
                [
                    str(python),
                    "train/pretrain.py",
                    "--config",
                    "tiny",
                    "--data",
                    str(shards),
                    "--output",
                    str(checkout / "run"),
                    "--max-steps",
                    "3",
                    "--log-every",
                    "1",
                    "--set",
                    "eval.every_epochs=0",
                ]
            ),
            cwd=checkout,
            env=offline_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert steps.returncode == 0, f"{what}: {steps.stdout[-3000:]}{steps.stderr[-3000:]}"
        assert "dali loader on cpu" in steps.stdout and "finished: step 3 of 3" in steps.stdout, (
            steps.stdout
        )
        # `run.sh test` keeps this set-up
        again = run_sh(checkout, "test", "--co", "-q", "tests/test_config.py")
        assert again.returncode == 0 and "[setup]" not in again.stdout, (
            again.stdout[-2000:] + again.stderr[-2000:]
        )
