"""WebDataset tar shards and DALI index files, written byte-for-byte deterministically."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pipeline.storage as storage
from pipeline.storage import Location

INDEX_VERSION = "v1.2"
_Place = TypeVar("_Place", str, Path)
_HEADER_BYTES = 64  # holds an index's first line, "v1.2 <count>"


def index_path(tar: _Place) -> _Place:
    """Where a shard's DALI index lives: beside it, `train-000000.tar` -> `train-000000.idx` (a path
    or an `s3://` URL, as the tar's)."""
    if isinstance(tar, Path):
        return tar.with_suffix(".idx")
    return str(tar).removesuffix(".tar") + ".idx"


@dataclass(frozen=True)
class Member:
    """One tar member: `<key>.<ext>` holding `data`."""

    key: str
    ext: str
    data: bytes


def _header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644  # integer mtime: plain USTAR, no PAX header
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Streams members into a USTAR tar and remembers where each one's data starts, for the
    index."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.entries: list[tuple[str, str, int, int]] = []  # (key, ext, data offset, size)

    def add(self, member: Member) -> None:
        name = f"{member.key}.{member.ext}"
        offset = self._tar.offset + tarfile.BLOCKSIZE  # data follows its 512-byte header
        self._tar.addfile(_header(name, len(member.data)), io.BytesIO(member.data))
        self.entries.append((member.key, member.ext, offset, len(member.data)))

    def close(self) -> None:
        self._tar.close()
        self._file.close()

    def index_text(self) -> str:
        return index_text(self.entries)


def index_text(entries: Iterable[tuple[str, str, int, int]]) -> str:
    """DALI's index format, exactly as `wds2idx` writes it: one line per sample, members in tar
    order."""
    samples: list[list[str]] = []
    last_key = None
    for key, ext, offset, size in entries:
        part = f"{ext} {offset} {size} {key}.{ext}"
        if key == last_key:
            samples[-1].append(part)
        else:
            samples.append([part])
            last_key = key
    lines = [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(parts) for parts in samples]
    return "\n".join(lines) + "\n"


def index_sample_count(path: Location) -> int:
    """The sample count from an index file's header line (`v1.2 <count>`), without reading the
    rest."""
    return int(storage.read_bytes(path, 0, _HEADER_BYTES).split(b"\n", 1)[0].split()[1])


def read_index(path: Location) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {ext: (data offset, size)}) for each sample of an index file, in tar order: one read
    of the whole file."""
    for line in storage.read_text(path).splitlines()[1:]:
        parts = line.split()
        yield split_name(parts[3])[0], {parts[i]: (int(parts[i + 1]), int(parts[i + 2]))
                                        for i in range(0, len(parts), 4)}


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key runs to the first dot of the file name."""
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".")
    prefix = name[: len(name) - len(base)]
    return prefix + base[:dot], base[dot + 1 :]


def read_members(path: Path) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.isfile():
                yield info, tar.extractfile(info).read()


def index_of_tar(path: Path) -> str:
    """The index `wds2idx` would write for an existing tar."""
    with tarfile.open(path, mode="r:") as tar:
        entries = [
            (*split_name(info.name), info.offset_data, info.size) for info in tar if info.isfile()
        ]
    return index_text(entries)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
