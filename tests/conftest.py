"""Test-wide settings: Triton runs in its CPU interpreter unless a GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined, i.e. before `kernels` is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import signal

import psutil
import pytest


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Sample shards: 64 train samples in 4 classes and 8 val samples (the tiny preset on 2 ranks: 4
    steps an epoch)."""
    from tests.runs import make_sample_shards  # after TRITON_INTERPRET is set: it imports the model

    return make_sample_shards(tmp_path_factory.mktemp("train_data"))


@pytest.fixture
def one_rank(monkeypatch):
    """What a launcher tells a single rank, so that a trainer can join its process group in this
    process; the signal handlers a run installs are given back when it ends."""
    from train.distributed import single_process_env

    for name, value in single_process_env().items():
        monkeypatch.setenv(name, value)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


def pytest_collection_modifyitems(config, items):
    # The GPU suite's whole dry run takes minutes that CI's budget does not have; it is run before a
    # GPU is used.
    if not os.environ.get("MAEFLOW_SUITE_DRY_RUN"):
        skip_dry_run = pytest.mark.skip(
            reason="the GPU suite's whole dry run: MAEFLOW_SUITE_DRY_RUN=1 bash run.sh "
            "test tests/test_gpu_suite.py, before a GPU run"
        )
        for item in items:
            if "suite_dry_run" in item.keywords:
                item.add_marker(skip_dry_run)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def no_job_outlives_its_test():
    """A test that fails or times out must not leave training ranks running into the next ones.

    Tests start their jobs with `helpers.start_job`, in sessions of their own. The test process's
    own workers (forked DataLoader workers, pools) share its session and are left to their owner,
    which raises if they die.
    """
    yield
    ours = os.getsid(0)
    jobs = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            if os.getsid(child.pid) != ours:
                child.kill()
                jobs.append(child)
    psutil.wait_procs(jobs, timeout=30)
