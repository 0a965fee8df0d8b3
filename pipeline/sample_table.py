"""Random access to the samples of a shard set, through the DALI index files (tar offset and size
of every member): what the PIL backend reads with, what the DALI backend writes its per-epoch index
files from, and how a DALI error is traced to its sample.

Sample i of a split is row i in shard order. The table holds only the shard sizes: a shard's index
is read when a sample of it is asked for, so a rank reads the indexes of its own share, not the data
set's.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

import pipeline.storage as storage
from pipeline.errors import DamagedIndex
from pipeline.manifest import ShardSet
from pipeline.wds_format import index_sample_count, read_index

# Shards whose parsed index stays at hand: a batch falls in one or two, and a logged batch asks
# again.
_SHARDS_KEPT = 8
_INDEX_READERS = 16  # index files read at once where many are needed


@dataclass(frozen=True)
class Entries:
    """Where some samples lie: `rows[i]` = (shard, jpg offset, jpg size, cls offset, cls size) of
    sample `samples[i]`, whose key is `keys[i]`; `tars[shard]` is the shard's tar."""

    samples: np.ndarray
    rows: np.ndarray
    keys: np.ndarray
    tars: list[str]

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, i: int, member: int) -> bytes:
        offset, size = (int(v) for v in self.rows[i, 1 + 2 * member: 3 + 2 * member])
        return storage.read_bytes(self.tars[int(self.rows[i, 0])], offset, size)

    def jpeg(self, i: int) -> bytes:
        return self._read(i, 0)

    def label(self, i: int) -> int:
        return int(self._read(i, 1))

    def name(self, i: int) -> str:
        """'<tar>: sample <key>', how errors name a sample."""
        return f"{self.tars[int(self.rows[i, 0])]}: sample {self.keys[i].decode()}"

    def index_lines(self) -> list[str]:
        """DALI index lines (jpg and cls members) of these samples, in their order."""
        return [
            f"jpg {r[1]} {r[2]} {k}.jpg cls {r[3]} {r[4]} {k}.cls"
            for r, k in zip(self.rows.tolist(), np.char.decode(self.keys).tolist(), strict=True)
        ]


class SampleTable:
    """The samples of a shard set, located on demand from the shards' index files."""

    def __init__(self, shards: ShardSet) -> None:
        self.tars = [str(p) for p in shards.tars]
        self.indexes = list(shards.indexes)
        self.shard_sizes = shards.sample_counts()
        self._ends = np.cumsum(np.asarray(self.shard_sizes, dtype=np.int64))
        self._shard = lru_cache(maxsize=_SHARDS_KEPT)(self._read_shard)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _read_shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, keys) of every sample of one shard, checked against its size."""
        idx, rows, keys = self.indexes[shard], [], []
        header = index_sample_count(idx)
        if header != self.shard_sizes[shard]:
            raise DamagedIndex(f"{idx}: the index header lists {header} samples, the manifest "
                               f"{self.shard_sizes[shard]}")
        for key, members in read_index(idx):
            if "jpg" not in members or "cls" not in members:
                raise DamagedIndex(f"{idx}: sample {key} lacks a jpg or cls member")
            rows.append((shard, *members["jpg"], *members["cls"]))
            keys.append(key)
        if len(rows) != self.shard_sizes[shard]:
            raise DamagedIndex(
                f"{idx}: the header says {self.shard_sizes[shard]} samples, the file lists "
                f"{len(rows)}"
            )
        return np.asarray(rows, dtype=np.int64).reshape(-1, 5), np.asarray(keys, dtype=np.bytes_)

    def entries(self, samples: np.ndarray) -> Entries:
        """Where `samples` lie, reading the index of each shard they fall in once."""
        samples = np.asarray(samples, dtype=np.int64)
        shards = np.searchsorted(self._ends, samples, side="right")
        by_shard = np.argsort(shards, kind="stable")
        rows = np.zeros((len(samples), 5), dtype=np.int64)
        found = []
        groups = (
            np.split(by_shard, np.flatnonzero(np.diff(shards[by_shard])) + 1)
            if len(samples)
            else []
        )
        needed = [int(shards[group[0]]) for group in groups]
        if len(needed) > 2:  # a rank's epoch: its indexes read side by side (a bucket's latency)
            with ThreadPoolExecutor(_INDEX_READERS) as pool:
                parsed = dict(zip(needed, pool.map(self._shard, needed), strict=True))
        else:
            parsed = {shard: self._shard(shard) for shard in needed}
        for group, shard in zip(groups, needed, strict=True):
            shard_rows, shard_keys = parsed[shard]
            local = samples[group] - (self._ends[shard] - self.shard_sizes[shard])
            rows[group] = shard_rows[local]
            found.append((group, shard_keys[local]))
        keys = np.zeros(
            len(samples), dtype=f"S{max((k.dtype.itemsize for _, k in found), default=1)}"
        )
        for group, shard_keys in found:
            keys[group] = shard_keys
        return Entries(samples, rows, keys, self.tars)

    def keys(self, samples: np.ndarray) -> list[str]:
        return np.char.decode(self.entries(samples).keys).tolist()

    def first_undecodable(self, samples: Iterable[int]) -> str | None:
        """The name of the first of `samples` PIL cannot decode, if any."""
        entries = self.entries(np.fromiter(samples, dtype=np.int64))
        for i in range(len(entries)):
            data = entries.jpeg(i)  # a read that fails is the storage's failure, not the image's
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
            except Exception:
                return entries.name(i)
        return None
