"""A shard build's per-image reports (an image rejected and why, an image converted and how), kept
on disk as they are met: a data set with millions of them costs the builder no memory, and the
manifest only their count."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from pipeline.atomic import atomic_path

REPORT_KINDS = ("rejected", "converted")


class Reports(Protocol):
    """Where a step of the build puts the reports it makes: a list in a worker process (a part's or
    a shard's, bounded), a `ReportSpill` in the builder's own process (the whole build's)."""

    def append(self, report: dict) -> None: ...


class ReportSpill:
    """Reports appended to a file as they are met, counted; read back in the same order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._sink = open(path, "w")  # noqa: SIM115 (closed on leaving its `with`)

    def append(self, report: dict) -> None:
        self._sink.write(json.dumps(report) + "\n")
        self.count += 1

    def extend(self, reports: Iterable[dict]) -> None:
        for report in reports:
            self.append(report)

    def __iter__(self) -> Iterator[dict]:
        self._sink.flush()
        return read_reports(self.path)

    def __enter__(self) -> ReportSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sink.close()


def read_reports(path: Path) -> Iterator[dict]:
    """A report file's reports, in order (none where there is no file)."""
    if not path.is_file():
        return
    with open(path) as lines:
        for line in lines:
            yield json.loads(line)


def write_reports(path: Path, reports: Iterable[dict]) -> int:
    """All of `reports` into `path`, complete or not at all; returns how many."""
    with atomic_path(path) as tmp, ReportSpill(tmp) as sink:
        sink.extend(reports)
    return sink.count
