"""Joining the job's process group, wherever the launcher (deepspeed, torchrun, srun, mpirun) put us.

Global rank and world size place a rank in the data; the local rank picks its GPU (and DALI's).
"""

from __future__ import annotations

import os
from datetime import timedelta

import deepspeed
import torch
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

from pipeline.loader import default_threads


class JoinError(RuntimeError):
    """The process group could not be formed; the message names the address and the flag to change."""


def join_process_group(timeout_s: float = 0) -> torch.device:
    """Join the group (gloo on CPUs, NCCL on GPUs) and return this rank's device. `timeout_s` bounds every
    collective (0: the library's default), so that a rank whose peer died stops instead of waiting forever."""
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Each rank computes on its share of the cores: ranks that each spread over all of them spin-wait
        # on each other's threads, and two CPU ranks ran 5-10x slower that way.
        torch.set_num_threads(default_threads())
        skip_shared_memory_op()
    try:
        deepspeed.init_distributed(**({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
    except (RuntimeError, ValueError, OSError) as err:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise JoinError(
            f"could not form the process group at {where} ({str(err).splitlines()[0]}); if another run on this "
            "machine uses that port, pick a free one: deepspeed --master_port N, or torchrun --master-port N "
            "(--rdzv-endpoint HOST:N)") from err
    return device


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce, which only its inference path uses.

    Every CPU rank would otherwise compile C++ on a machine's first run (a minute on 2 cores) under a lock
    file in ~/.cache/torch_extensions; a rank killed while holding it leaves the lock behind, and every
    later run on that machine then waits on it forever.
    """
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
