"""Files that are complete or absent, and on the disk once they say so: write beside the target,
flush the bytes to the disk (fsync), rename over the target, then flush the folder that holds the
new name.

The one home of this rule for the whole project (shards, indexes, manifests, checkpoints, exports,
bench history). `os.replace` is atomic on POSIX file systems, so a reader or a resumed job never
sees a half-written file, whatever killed the writer. The fsyncs make it hold across a power loss or
a node's crash too: without them a local file system (ext4, xfs) may keep the rename and lose the
bytes, and a file marked complete comes back empty or short. Whatever marks other files complete (a
checkpoint's completion mark, a manifest) is written after them, so that the mark is never on the
disk before what it vouches for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The name a file is written under before it is renamed into place."""
    return path.with_name(path.name + ".tmp")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's bytes, or a folder's entries, from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(written: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished file `written` in place as `target`, on the disk before and after the
    rename."""
    fsync_path(written)
    os.replace(written, target)
    fsync_path(Path(target).parent)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path` durably, on an exception it
    is removed."""
    target = Path(path)
    tmp = temporary_name(target)
    try:
        yield tmp
        durable_replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
