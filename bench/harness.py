"""Timing and the history file every bench stage writes into.

Rules (the "honesty of the numbers"): warm up before timing; on CUDA, time with events and
synchronize around the timed region; report median, min and max over repeats; measure the baseline
in the same process run; tag numbers from a CPU or the Triton interpreter so that the report never
puts them in one table with GPU numbers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_write_text
from pipeline.formats import check_format, stamp

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HISTORY = REPO / "bench" / "history"


@dataclass(frozen=True)
class Stat:
    """A measurement over repeats, in `unit` (higher is better for every unit bench reports)."""

    median: float
    min: float
    max: float
    repeats: int


def time_repeats(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str = "cpu"
) -> list[float]:
    """Seconds per call of `fn`, after `warmup` untimed calls; CUDA calls are timed with events."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - began)
    return seconds


def device_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> list[float]:
    """GPU busy time per call of `fn`: the summed durations of the kernels (and copies) it launched,
    read from the profiler. This is what the op costs inside a training step, where the CPU runs
    ahead of the GPU; wall time around a single small op also counts its Python and launch overhead.
    One profiler session for all the repeats (a session costs far more than a small op), each repeat
    in a range of its own."""
    from torch.profiler import ProfilerActivity, profile, record_function  # only GPU runs profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            with record_function(_REPEAT):
                fn()
        torch.cuda.synchronize()
    ranges = [e for e in prof.events() if e.name == _REPEAT]
    micros = [getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) for e in ranges]
    # kernels not attributed to their ranges: their mean instead
    if len(micros) != repeats or not sum(micros):
        total = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
        micros = [total / repeats] * repeats
    return [m / 1e6 for m in micros]


_REPEAT = "maeflow_bench_repeat"


def rate(work: float, seconds: list[float]) -> Stat:
    """Throughput `work / seconds` over the repeats (the slowest repeat is the min)."""
    rates = [work / s for s in seconds]
    return Stat(statistics.median(rates), min(rates), max(rates), len(rates))


def stat_of(values: list[float]) -> Stat:
    return Stat(statistics.median(values), min(values), max(values), len(values))


@dataclass
class Record:
    """One measurement: ours against the baseline a user would otherwise run, from the same run."""

    stage: str
    name: str
    unit: str
    ours: Stat
    baseline: Stat | None = None
    baseline_name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    interpreter: bool = False  # Triton interpreter numbers measure correctness plumbing, not speed
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.ours.median / self.baseline.median if self.baseline else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        return out


@contextlib.contextmanager
def kernels_backend(choice: str) -> Iterator[None]:
    """MAE_KERNELS=choice for the block (torch, triton or auto), restored after."""
    previous = os.environ.get("MAE_KERNELS")
    os.environ["MAE_KERNELS"] = choice
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MAE_KERNELS")
        else:
            os.environ["MAE_KERNELS"] = previous


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "device": device,
    }
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name()
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["gpus"] = torch.cuda.device_count()
    info["versions"] = {
        p: _version(p)
        for p in (
            "torch",
            "triton",
            "nvidia-dali-cuda120",
            "nvidia-dali-cuda130",
            "deepspeed",
            "webdataset",
            "pillow",
        )
    }
    return info


def device_label(device: str) -> str:
    if device != "gpu":
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    return "gpu-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")


class History:
    """`<dir>/<date>-<sha>-<device>.json`: the machine description and, per stage run, its records,
    each written as soon as it is measured, so that a stage cut short keeps what it had measured.
    `mirror`: a folder that holds a copy of the file (and of its profiles) at every moment, such as
    the folder a job's outputs are collected from.
    """

    def __init__(self, folder: Path, device: str, quick: bool, mirror: Path | None = None) -> None:
        self.device, self.mirror = device, mirror
        sha = _git("rev-parse", "--short", "HEAD") or "nogit"
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        self.path = (
            Path(folder) / f"{date}-{sha}{'-dirty' if dirty else ''}-{device_label(device)}.json"
        )
        self.meta = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": sha,
            "dirty": dirty,
            "quick": quick,
            "machine": machine_info(device),
        }
        self._run: int | None = None  # this stage run's index in the file

    def start_run(self) -> None:
        """The next records belong to a new stage run."""
        self._run = None

    def add(self, record: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = (
            json.loads(self.path.read_text())
            if self.path.is_file()
            else stamp("bench_history", {"runs": []})
        )
        if self._run is None:
            payload["runs"].append({**self.meta, "records": []})
            self._run = len(payload["runs"]) - 1
        payload["runs"][self._run]["records"].append(record.to_json())
        self.write(self.path, json.dumps(payload, indent=1) + "\n")

    def append(self, records: list[Record]) -> None:
        """One stage run of `records`."""
        self.start_run()
        for record in records:
            self.add(record)

    def write(self, path: Path, text: str) -> None:
        """A file of this history (it, or a profile beside it), and its copy in the mirror."""
        atomic_write_text(path, text)
        if self.mirror is not None:
            self.mirror.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.mirror / path.name, text)


def load_history(folder: Path) -> list[dict[str, Any]]:
    """Every run in every history file of `folder`, oldest first."""
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        payload = json.loads(path.read_text())
        check_format("bench_history", payload, str(path))
        for run in payload["runs"]:
            runs.append({**run, "file": path.name})
    return sorted(runs, key=lambda r: r["date"])
