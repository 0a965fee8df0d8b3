"""Test-wide settings: Triton runs in its CPU interpreter unless a GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined, i.e. before `kernels` is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib

import psutil
import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """A test that fails or times out must not leave training ranks running into the next ones."""
    yield
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=30)
