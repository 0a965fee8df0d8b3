"""The format policy, in one place: every file maeflow writes for a later reader carries its
format's version, and a reader takes only the versions it knows.

The kinds and their versions are below. maeflow has had no release yet, so each reader takes exactly
the version this maeflow writes, and refuses another in one line naming the file, both versions and
what to do. From the first tagged release on, a change to a format raises its version here, and the
readers keep reading every version a release wrote (a checkpoint of release N resumes under N + 1),
each such branch named by the release that wrote it; versions written only between releases are
never read back.
"""

from __future__ import annotations

from typing import Any

VERSIONS = {
    # <split>.json: the shards, their counts and digests, the classes, the build's plan
    "manifest": 1,
    "build_progress": 1,  # OUT/<split>.progress.jsonl: the shards a build finished (its first line)
    "config": 1,  # OUTPUT/config.json, and the config inside exported weights and best.pth
    "checkpoint": 1,  # a checkpoint's completion mark (train_state.json)
    "loader_state": 1,  # a rank's reading position, inside each checkpoint's rank file
    "weights": 1,  # train.export files and best.pth: the weights and where they came from
    "run_log": 1,  # metrics.jsonl: the format is in each run's "started" record
    "bench_history": 1,  # bench/history/*.json
}
KEY = "format"


class FormatError(ValueError):
    """A file in a format this maeflow does not read: the message names the file, both versions and
    what to do."""


def stamp(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` with the version of `kind` that this maeflow writes."""
    return {KEY: VERSIONS[kind], **payload}


def check_format(kind: str, payload: dict[str, Any], where: str) -> None:
    """FormatError unless `payload` (read from `where`) is in the version of `kind` this maeflow
    reads."""
    found = payload.get(KEY) if isinstance(payload, dict) else None
    if found != VERSIONS[kind]:
        raise FormatError(
            f"{where} is a {kind.replace('_', ' ')} in format {found!r} and this maeflow reads "
            f"format {VERSIONS[kind]}: write it again with this maeflow, or use the maeflow that "
            "wrote it"
        )
