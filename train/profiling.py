"""A few steps of the real trainer under torch.profiler, reduced to a small text table a person can
read:

- the top kernels by device time (on a CPU: the top operators by their own CPU time);
- the device's idle time between kernels, the gaps a faster host or CUDA graphs would fill;
- host syncs per step (stream, device and event synchronizations, device-to-host copies);
- communication time (NCCL kernels; on a CPU, gloo's collectives).

`log.profile_steps` turns it on: after two warm-up steps that many optimizer steps are profiled, and
rank 0 writes OUTPUT/profile.txt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from pipeline.atomic import atomic_write_text

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COMMUNICATION = (
    "nccl",
    "allreduce",
    "all_reduce",
    "allgather",
    "all_gather",
    "reduce_scatter",
    "gloo",
    "broadcast",
)
WARMUP_STEPS = 2


def step_profiler(steps: int, device: torch.device, write: Callable[[str], None]) -> profile:
    """A profiler to `.step()` after every optimizer step: it skips the first steps, records `steps`
    of them, and hands the table to `write`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def done(prof: profile) -> None:
        write(profile_table(prof, steps, device.type == "cuda"))

    return profile(
        activities=activities,
        schedule=schedule(wait=WARMUP_STEPS - 1, warmup=1, active=steps, repeat=1),
        on_trace_ready=done,
    )


def profile_table(prof: profile, steps: int, cuda: bool, top: int = 15) -> str:
    """The profile of `steps` optimizer steps as text."""
    # the steps' own marks
    averages = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    if cuda:
        timed = [
            (e.key, e.count, e.self_device_time_total)
            for e in averages
            if e.self_device_time_total > 0
        ]
        unit = "device"
    else:
        timed = [
            (e.key, e.count, e.self_cpu_time_total) for e in averages if e.self_cpu_time_total > 0
        ]
        unit = "CPU (own)"
    timed.sort(key=lambda row: -row[2])
    total_us = sum(t for _, _, t in timed) or 1.0
    lines = [f"profile of {steps} optimizer steps ({'CUDA' if cuda else 'CPU'})", "",
             f"top {top} by {unit} time:", f"{'ms/step':>9} {'share':>6} {'calls/step':>10}  name"]
    for name, count, us in timed[:top]:
        lines.append(
            f"{us / 1000 / steps:9.3f} {100 * us / total_us:5.1f}% {count / steps:10.1f}  "
            f"{name[:90]}"
        )
    communication_us = sum(
        t for name, _, t in timed if any(c in name.lower() for c in COMMUNICATION)
    )
    syncs = sum(e.count for e in averages if e.key in SYNC_CALLS)
    copies_to_host = sum(e.count for e in averages if "DtoH" in e.key and "Memcpy" in e.key)
    lines += [
        "",
        f"{unit} time per step: {total_us / 1000 / steps:.3f} ms",
        f"communication per step: {communication_us / 1000 / steps:.3f} ms "
        f"({100 * communication_us / total_us:.1f}%)",
        f"host syncs per step: {syncs / steps:.1f} synchronize calls, {copies_to_host / steps:.1f} "
        "device-to-host copies",
    ]
    if cuda:
        idle_us, span_us = device_idle_us(prof.events())
        lines.append(f"device idle between kernels: {idle_us / 1000 / steps:.3f} ms per step "
                     f"({100 * idle_us / max(span_us, 1.0):.1f}% of the profiled span)")
    return "\n".join(lines) + "\n"


def device_idle_us(events: Any) -> tuple[float, float]:
    """(time no kernel ran, the span from the first kernel's start to the last one's end), in
    microseconds."""
    intervals = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not intervals:
        return 0.0, 0.0
    busy, (start, end) = 0.0, intervals[0]
    for begin, finish in intervals[1:]:
        if begin > end:
            busy += end - start
            start, end = begin, finish
        else:
            end = max(end, finish)
    busy += end - start
    span = max(finish for _, finish in intervals) - intervals[0][0]
    return span - busy, span


def write_profile(output: Path) -> Callable[[str], None]:
    def write(table: str) -> None:
        atomic_write_text(output / "profile.txt", table)
    return write
