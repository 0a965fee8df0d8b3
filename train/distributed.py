"""Joining the job's process group, wherever the launcher (deepspeed, torchrun, srun, mpirun) put
us.

Global rank and world size place a rank in the data; the local rank picks its GPU (and DALI's).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

from pipeline.loader import default_threads

T = TypeVar("T")
# Where a launcher says which rank a process is: torchrun, deepspeed and srun scripts set RANK;
# mpirun its own.
LAUNCHER_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class JoinError(RuntimeError):
    """The process group could not be formed; the message names the address and the flag to
    change."""


class DeviceError(RuntimeError):
    """The scheduler gave this rank GPUs that its torch cannot use (a CPU build, installed on a
    login node)."""


# Where a scheduler says it gave a process GPUs (lists of GPU ids). CUDA_VISIBLE_DEVICES counts only
# on a machine with NVIDIA devices: launchers set it on CPU machines too (deepspeed --num_gpus 2
# sets "0,1").
SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


def allocated_gpus() -> str | None:
    """`NAME=value` of the variable that gives this process GPUs, or None."""
    present = Path("/dev/nvidia0").exists() or any(Path("/proc/driver/nvidia/gpus").glob("*"))
    for name in (*SLURM_GPU_VARIABLES, *(("CUDA_VISIBLE_DEVICES",) if present else ())):
        value = os.environ.get(name, "").strip()
        if value and value != "NoDevFiles" and not value.startswith("-"):
            return f"{name}={value}"
    count = os.environ.get("SLURM_GPUS_ON_NODE", "")
    return f"SLURM_GPUS_ON_NODE={count}" if count.isdigit() and int(count) > 0 else None


def rank_device() -> torch.device:
    """This rank's device: its GPU among those it sees, else the CPU. A task bound to its own GPU
    sees that one alone (srun --gpus-per-task, --gpu-bind): index 0; a task seeing the whole node
    takes its local rank's; in general the local rank modulo the GPUs it sees. GPUs allocated to a
    torch without CUDA are refused."""
    if not torch.cuda.is_available():
        allocated = allocated_gpus()
        if allocated:
            build = (
                f"a CPU build ({torch.__version__})"
                if torch.version.cuda is None
                else f"built for CUDA {torch.version.cuda} but sees no GPU (a driver problem: try "
                     "nvidia-smi)"
            )
            raise DeviceError(
                f"{allocated} gives this rank GPUs, and its torch is {build}: install the CUDA "
                "build with `bash run.sh setup --cuda` (on a login node without GPUs, setup picks "
                "the CPU build unless told)"
            )
        return torch.device("cpu")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def local_rank() -> int:
    """This rank's place on its node, as its launcher says (torchrun, deepspeed: LOCAL_RANK; srun:
    SLURM_LOCALID)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def join_process_group(timeout_s: float = 0) -> torch.device:
    """Join the group (gloo on CPUs, NCCL on GPUs) and return this rank's device. `timeout_s` bounds
    every collective (0: the library's default), so that a rank whose peer died stops instead of
    waiting forever."""
    # `python train/pretrain.py`: one process
    if not any(name in os.environ for name in LAUNCHER_VARIABLES):
        os.environ.update(single_process_env())
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Each rank computes on its share of the cores: ranks that each spread over all of them
        # spin-wait on each other's threads, and two CPU ranks ran 5-10x slower that way.
        torch.set_num_threads(default_threads())
        skip_shared_memory_op()
    try:
        deepspeed.init_distributed(
            **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {})
        )
    except (RuntimeError, ValueError, OSError) as err:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise JoinError(
            f"could not form the process group at {where} ({str(err).splitlines()[0]}); if another "
            "run on this machine uses that port, pick a free one: deepspeed --master_port N, or "
            "torchrun --master-port N (--rdzv-endpoint HOST:N)"
        ) from err
    return device


def single_process_env() -> dict[str, str]:
    """What a launcher would tell the one rank of a one-process run (a free port on this host)."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def free_port() -> int:
    """A TCP port nothing listens on now, for one more rendezvous on this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce, which only its inference
    path uses.

    Every CPU rank would otherwise compile C++ on a machine's first run (a minute on 2 cores) under
    a lock file in ~/.cache/torch_extensions; a rank killed while holding it leaves the lock behind,
    and every later run on that machine then waits on it forever.
    """
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def leave_process_group() -> None:
    """Tear the process group down before the interpreter does: left to exit-time destructors, a
    group can abort the process ("terminate called without an active exception") and turn a
    refusal's status into a crash's."""
    if dist.is_initialized():
        # after a lost peer the group may refuse; the process ends anyway
        with contextlib.suppress(RuntimeError):
            # DeepSpeed's call also drops the groups it cached: a later run in
            if deepspeed.comm.is_initialized():
                # this process would otherwise meet the dead group's
                deepspeed.comm.destroy_process_group()
            else:
                dist.destroy_process_group()


def agree(work: Callable[[], T], group: Any) -> T:
    """`work` on every rank, and its failure on any rank a failure on all, so that no rank is left
    waiting at the next collective. This rank's own error is raised as it is; another rank's with
    its type, naming that rank."""
    try:
        result, error = work(), None
    except Exception as err:  # every kind goes to the peers, then is raised again below
        result, error = None, err
    errors: list[tuple[type, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(
        errors, None if error is None else (type(error), str(error)), group=group
    )
    if error is not None:
        raise error
    failed = next(((rank, sent) for rank, sent in enumerate(errors) if sent), None)
    if failed:
        rank, (kind, message) = failed
        raise _same_kind(kind, f"rank {rank}: {message}")
    return result


class StepVote:
    """The decisions every rank must take at the same optimizer step though only some ranks see
    their cause (a stop signal, a checkpoint due by the clock), agreed without holding any rank at
    any step: the votes of step k leave in an all-reduce issued at step k, without waiting, and
    decide step k + 1, by when they have long arrived. A cause is acted on one step after it is
    seen, on every rank alike. A blocking vote at every step would cost every step a round trip over
    the ranks, one that grows with their number."""

    def __init__(self, group: Any, size: int) -> None:
        self.group, self.size = group, size
        self._pending: tuple[torch.Tensor, Any] | None = None

    def cast(self, *votes: bool) -> tuple[bool, ...]:
        """Send this step's votes; return what every rank voted at the previous step (any rank's yes
        is a yes)."""
        decided = self._collect()
        sent = torch.tensor(votes, dtype=torch.int32)
        self._pending = (
            sent,
            dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
        )
        return decided

    def _collect(self) -> tuple[bool, ...]:
        if self._pending is None:
            return (False,) * self.size
        sent, work = self._pending
        self._pending = None
        work.wait()
        return tuple(bool(v) for v in sent.tolist())

    def close(self) -> None:
        """Wait for the vote in flight, so that no collective is left pending when the group goes
        (one that a lost peer broke has nothing to wait for)."""
        with contextlib.suppress(RuntimeError):
            self._collect()


def from_rank_zero(work: Callable[[], T], group: Any) -> T:
    """`work` on rank 0 alone (reading what every rank would read the same: once, not once per
    rank), and its result, or its error with its type, on every rank."""
    box = [agree(lambda: work() if dist.get_rank() == 0 else None, group)]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _same_kind(kind: type, message: str) -> Exception:
    """An exception of `kind` saying `message`; a RuntimeError naming the kind where it takes no
    message."""
    try:
        return kind(message)
    except Exception:  # a constructor that takes other arguments
        return RuntimeError(f"{kind.__name__}: {message}")


class Peers:
    """Where every rank runs (host, pid, local rank, device), gathered once at start: to name the
    rank a failed collective lost, and for the run's `started` record."""

    def __init__(self, group: Any, device: torch.device) -> None:
        self.rank = dist.get_rank()
        self.ranks: list[tuple[str, int, int, str]] = [("", 0, 0, "")] * dist.get_world_size()
        here = (socket.gethostname(), os.getpid(), local_rank(), str(device))
        dist.all_gather_object(self.ranks, here, group=group)

    @property
    def hosts(self) -> list[str]:
        return [host for host, *_ in self.ranks]

    def placement(self) -> list[dict[str, Any]]:
        return [{"rank": rank, "host": host, "local_rank": local, "device": device}
                for rank, (host, _, local, device) in enumerate(self.ranks)]

    def lost(self) -> str:
        """Which ranks are gone, as far as this host can tell (a process on another host cannot be
        asked)."""
        here = socket.gethostname()
        gone, elsewhere = [], []
        for rank, (host, pid, *_) in enumerate(self.ranks):
            if rank == self.rank:
                continue
            if host != here:
                elsewhere.append(f"{rank} ({host})")
            elif not _alive(pid):
                gone.append(f"rank {rank} (host {host}, pid {pid}) is no longer running")
        if gone:
            return "; ".join(gone)
        return (
            f"lost contact with a peer: ranks on other hosts: {', '.join(elsewhere)}"
            if elsewhere
            else ""
        )


def _alive(pid: int) -> bool:
    """Whether process `pid` on this host still runs (a zombie, dead but not yet reaped by its
    launcher, does not)."""
    try:
        os.kill(pid, 0)
    # gone, or the pid now belongs to someone else's process
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc here: the signal check is all there is
        return True
