"""The builder's global shuffle in memory bounded whatever the data set's size: an external sort by
a keyed hash.

The images' order is their order by `order_key`, a seeded 128-bit hash of each image's name: a
uniformly random order that depends on the set of images and the seed alone, not on the order the
input lists them in (a folder walk, a tar's members, a zip's directory). Sorting by it needs no step
that holds every image:
1. the listing streams into up to 256 part files by the first byte of the key (`spill`);
2. worker processes order the parts (`ordered_parts`): a part of at most `buffer` candidates is
read, labelled and
   sorted in memory; a larger one is first split by the next byte of the key, recursively. The
   parts, taken in byte order, are the whole order: splitting changes nothing in it, so the shards
   are the same whatever the buffer and the workers.
Memory: a buffer of candidates per worker, and up to 256 open files while splitting. Disk, under OUT
while the build
runs: the spill and the ordered parts made of it, about 350 bytes an image with ImageNet's names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.archives import Entry
from pipeline.seeds import stream_key
from pipeline.shard_labels import Candidate, LabelCounts, Labelling, SourceImage
from pipeline.shard_listing import images_only

KEY_BYTES = 16
DEFAULT_SORT_BUFFER = 200_000  # candidates in memory at once, per worker: about 0.2 GB


def order_key(shuffle: bytes, name: str) -> bytes:
    """Where the image named `name` lies in the shuffle keyed `shuffle` (the seed's stream_key
    "shard shuffle")."""
    return hashlib.blake2b(name.encode(), digest_size=KEY_BYTES, key=shuffle).digest()


@dataclass(frozen=True)
class SpillFile:
    path: Path
    count: int
    """candidates in it, one per line: `<key hex>\\t<json row>`"""


def spill(candidates: Iterable[Candidate], seed: int, stem: Path) -> list[SpillFile]:
    """Write the candidates, as the listing streams them, beside their keys, parted by the key's
    first byte."""
    shuffle = stream_key(seed, "shard shuffle")
    lines = (f"{order_key(shuffle, c.name).hex()}\t{json.dumps([c.name, c.label, c.entry.row()])}\n"
             for c in candidates)
    return _part(lines, stem, 0)


def _part(lines: Iterable[str], stem: Path, level: int) -> list[SpillFile]:
    """The lines in files `<stem>.<byte>` by byte `level` of their key, in byte order."""
    sinks, counts = {}, {}
    try:
        for line in lines:
            part = int(line[2 * level:2 * level + 2], 16)
            if part not in sinks:
                sinks[part] = open(f"{stem}.{part:02x}", "w")  # noqa: SIM115 (closed below)
                counts[part] = 0
            sinks[part].write(line)
            counts[part] += 1
    finally:
        for sink in sinks.values():
            sink.close()
    return [SpillFile(Path(f"{stem}.{part:02x}"), counts[part]) for part in sorted(sinks)]


@dataclass
class OrderedPart:
    """A part's images in the shuffle's order, kept on disk one JSON row a line, and what the plan
    needs of them."""

    path: Path
    sizes: array = field(default_factory=lambda: array("q"))
    """each image's source size, in order, for cutting shards (8 bytes an image)"""
    rejected: list[dict] = field(default_factory=list)
    labels: LabelCounts = field(default_factory=LabelCounts)
    digest: bytes = b""
    """sha256 of the images' names, sizes and labels, in order: the part's share of the plan's
    fingerprint"""


def ordered_parts(
    parts: list[SpillFile], labelling: Labelling, buffer: int, workers: int
) -> Iterator[OrderedPart]:
    """Each part ordered, in byte order; `workers` processes order them side by side."""
    order = functools.partial(order_part, labelling=labelling, buffer=buffer)
    if workers <= 1 or len(parts) <= 1:
        yield from map(order, parts)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        # imap keeps the parts' order; chunks of a few parts send the labelling once per chunk, not
        # once per part
        yield from pool.imap(order, parts, chunksize=max(1, len(parts) // (8 * workers)))


def order_part(part: SpillFile, labelling: Labelling, buffer: int) -> OrderedPart:
    """Label and sort one part (split further while it is over `buffer`), writing its images beside
    it."""
    result = OrderedPart(Path(f"{part.path}.ordered"))
    digest = hashlib.sha256()
    with open(result.path, "w") as sink:
        for group in _groups(part, buffer, level=1):
            images = images_only(labelling.label(group, result.rejected), result.rejected)
            for image in images:
                sink.write(json.dumps(image.row()) + "\n")
                digest.update(f"{image.rel}\0{image.size}\0{image.label}\n".encode())
            result.sizes.extend(image.size for image in images)
            result.labels.add(images)
    result.digest = digest.digest()
    return result


def _groups(part: SpillFile, buffer: int, level: int) -> Iterator[list[Candidate]]:
    """The part's candidates in key order (then by name), in groups of at most `buffer`; read files
    are removed."""
    if part.count > buffer and level < KEY_BYTES:
        with open(part.path) as lines:
            pieces = _part(lines, part.path, level)
        part.path.unlink()
        for piece in pieces:
            yield from _groups(piece, buffer, level + 1)
        return
    with open(part.path) as lines:
        rows = [
            (key, json.loads(row))
            for key, row in (line.rstrip("\n").split("\t", 1) for line in lines)
        ]
    part.path.unlink()
    # key, image name, entry name
    rows.sort(key=lambda keyed: (keyed[0], keyed[1][0], keyed[1][2][0]))
    yield [Candidate(name, Entry.from_row(entry), label) for _, (name, label, entry) in rows]


def read_images(paths: Iterable[Path]) -> Iterator[SourceImage]:
    """The images of ordered parts, in order."""
    for path in paths:
        with open(path) as rows:
            for row in rows:
                yield SourceImage.from_row(json.loads(row))
