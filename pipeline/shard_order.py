"""The builder's global shuffle in memory bounded whatever the data set's size: an external sort by a keyed hash.

The images' order is their order by `order_key`, a seeded 128-bit hash of each image's name: a uniformly random
order that depends on the set of images and the seed alone, not on the order the input lists them in (a folder
walk, a tar's members, a zip's directory). Sorting by it needs no step that holds every image:
1. the listing streams into one spill file, each candidate beside its key (`spill`);
2. a spill file of at most `buffer` candidates is read, labelled and sorted in memory; a larger one is first split
   by the next byte of the key into up to 256 files, recursively, taken in byte order (`ordered`). Splitting
   changes nothing in the order, so the shards are the same whatever the buffer.
Memory: one buffer of candidates, and up to 256 open files while splitting. Disk: the spill, about 200 bytes an
image, under OUT while the build plans.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.archives import Entry
from pipeline.shard_sources import Candidate, Labelling, SourceImage, images_only

KEY_BYTES = 16
DEFAULT_SORT_BUFFER = 200_000  # candidates in memory at once: about 0.2 GB


def order_key(seed: int, name: str) -> bytes:
    """Where the image named `name` lies in the shuffle of `seed`."""
    return hashlib.blake2b(name.encode(), digest_size=KEY_BYTES, key=str(seed).encode()).digest()


@dataclass(frozen=True)
class SpillFile:
    path: Path
    count: int
    """candidates in it, one per line: `<key hex>\\t<json row>`"""


def spill(candidates: Iterable[Candidate], seed: int, path: Path) -> SpillFile:
    """Write the candidates, as the listing streams them, to one file beside their keys."""
    count = 0
    with open(path, "w") as sink:
        for candidate in candidates:
            row = json.dumps([candidate.name, candidate.label, candidate.entry.row()])
            sink.write(f"{order_key(seed, candidate.name).hex()}\t{row}\n")
            count += 1
    return SpillFile(path, count)


def ordered(source: SpillFile, labelling: Labelling, buffer: int, rejected: list[dict],
            level: int = 0) -> Iterator[SourceImage]:
    """The spilled candidates' images in the order of their keys (then names), at most `buffer` in memory; each
    spill file is removed once read. The labelling's rejections go to `rejected`, in the same order."""
    if source.count > buffer and level < KEY_BYTES:
        for part in _split(source, level):
            yield from ordered(part, labelling, buffer, rejected, level + 1)
        return
    with open(source.path) as lines:
        rows = [(key, json.loads(row)) for key, row in (line.rstrip("\n").split("\t", 1) for line in lines)]
    source.path.unlink()
    rows.sort(key=lambda keyed: (keyed[0], keyed[1][0], keyed[1][2][0]))  # key, image name, entry name
    group = [Candidate(name, Entry.from_row(entry), label) for _, (name, label, entry) in rows]
    del rows
    yield from images_only(labelling.label(group, rejected), rejected)


def _split(source: SpillFile, level: int) -> list[SpillFile]:
    """The file's lines, parted by byte `level` of their key, in byte order."""
    sinks, counts = {}, {}
    try:
        with open(source.path) as lines:
            for line in lines:
                part = int(line[2 * level:2 * level + 2], 16)
                if part not in sinks:
                    sinks[part] = open(f"{source.path}.{part:02x}", "w")  # noqa: SIM115 (closed below)
                    counts[part] = 0
                sinks[part].write(line)
                counts[part] += 1
    finally:
        for sink in sinks.values():
            sink.close()
    source.path.unlink()
    return [SpillFile(Path(f"{source.path}.{part:02x}"), counts[part]) for part in sorted(sinks)]
