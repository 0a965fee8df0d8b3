"""Random access to the samples of a shard set, through the DALI index files (tar offset and size
of every member): what the PIL backend reads with, and how a DALI error is traced to its sample."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.manifest import ShardSet
from pipeline.wds_format import read_index


class SampleTable:
    """Row i = sample i of the split in shard order: which tar, and where its jpg and cls members lie."""

    def __init__(self, shards: ShardSet) -> None:
        self.tars = [str(p) for p in shards.tars]
        rows, self.keys = [], []
        for shard, idx in enumerate(shards.indexes):
            for key, members in read_index(idx):
                if "jpg" not in members or "cls" not in members:
                    raise ValueError(f"{idx}: sample {key} lacks a jpg or cls member")
                rows.append((shard, *members["jpg"], *members["cls"]))
                self.keys.append(key)
        # (shard, jpg offset, jpg size, cls offset, cls size)
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 5)

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
        return f"{self.tars[int(self.rows[sample, 0])]}: sample {self.keys[sample]}"

    def first_undecodable(self, samples: range) -> str | None:
        """The name of the first of `samples` PIL cannot decode, if any."""
        for sample in samples:
            try:
                with Image.open(io.BytesIO(self.jpeg(sample))) as img:
                    img.load()
            except Exception:
                return self.name(sample)
        return None
