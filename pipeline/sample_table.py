"""Random access to the samples of a shard set, through the DALI index files (tar offset and size
of every member): what the PIL backend reads with, and how a DALI error is traced to its sample."""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from PIL import Image

from pipeline.errors import DataError
from pipeline.manifest import ShardSet
from pipeline.wds_format import read_index


class SampleTable:
    """Row i = sample i of the split in shard order: which tar, and where its jpg and cls members lie."""

    def __init__(self, shards: ShardSet) -> None:
        self.tars = [str(p) for p in shards.tars]
        rows, keys, self.shard_sizes = [], [], []
        for shard, (idx, count) in enumerate(zip(shards.indexes, shards.sample_counts(), strict=True)):
            for key, members in read_index(idx):
                if "jpg" not in members or "cls" not in members:
                    raise DataError(f"{idx}: sample {key} lacks a jpg or cls member")
                rows.append((shard, *members["jpg"], *members["cls"]))
                keys.append(key)
            if len(rows) != sum(self.shard_sizes) + count:
                raise DataError(f"{idx}: the header says {count} samples, the file lists "
                                 f"{len(rows) - sum(self.shard_sizes)}")
            self.shard_sizes.append(count)
        # (shard, jpg offset, jpg size, cls offset, cls size)
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
        self.keys = np.asarray(keys, dtype=np.bytes_)  # compact: an ImageNet split has 1.28M of them

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        with open(self.tars[shard], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def jpeg(self, sample: int) -> bytes:
        shard, offset, size = (int(v) for v in self.rows[sample, :3])
        return self._read(shard, offset, size)

    def label(self, sample: int) -> int:
        shard, _, _, offset, size = (int(v) for v in self.rows[sample])
        return int(self._read(shard, offset, size))

    def name(self, sample: int) -> str:
        """'<tar>: sample <key>', how errors name a sample."""
        return f"{self.tars[int(self.rows[sample, 0])]}: sample {self.keys[sample].decode()}"

    def index_lines(self, samples: np.ndarray) -> list[str]:
        """DALI index lines (jpg and cls members) for `samples`, in that order."""
        rows, keys = self.rows[samples], self.keys[samples]
        return [f"jpg {r[1]} {r[2]} {k.decode()}.jpg cls {r[3]} {r[4]} {k.decode()}.cls" for r, k in zip(rows, keys,
                                                                                                     strict=True)]

    def first_undecodable(self, samples: Iterable[int]) -> str | None:
        """The name of the first of `samples` PIL cannot decode, if any."""
        for sample in samples:
            try:
                with Image.open(io.BytesIO(self.jpeg(sample))) as img:
                    img.load()
            except Exception:
                return self.name(sample)
        return None
