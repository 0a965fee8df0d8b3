"""Every random stream of a run, derived one way from one root seed: a named stream and its indices
(an epoch, a rank, a step...) give a seed, so that streams never share draws, a stream is reproduced
from its name alone wherever and whenever it is drawn (a resumed run, another rank count), and a new
stream is a new name."""

from __future__ import annotations

import hashlib

import numpy as np


def stream_seed(root: int, name: str, *indices: int) -> int:
    """The 63-bit seed of stream `name` at `indices` under root seed `root`."""
    text = ":".join([str(root), name, *(str(int(i)) for i in indices)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def stream(root: int, name: str, *indices: int) -> np.random.Generator:
    """A numpy generator of stream `name` at `indices` under root seed `root`."""
    return np.random.default_rng(stream_seed(root, name, *indices))


def stream_key(root: int, name: str) -> bytes:
    """Stream `name`'s key for a keyed hash (the shard builder's shuffle orders images by one)."""
    return stream_seed(root, name).to_bytes(8, "little")
