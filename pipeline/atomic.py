"""Files that are complete or absent: write beside the target, then rename over it.

The one home of this rule for the whole project (shards, manifests, checkpoints, exports, bench
history): `os.replace` is atomic on POSIX file systems, so a reader or a resumed job never sees a
half-written file, whatever killed the writer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The name a file is written under before it is renamed into place."""
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on an exception it is removed."""
    target = Path(path)
    tmp = temporary_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
