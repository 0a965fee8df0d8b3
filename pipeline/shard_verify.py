"""`--verify`: re-read every shard of a split and check it against its manifest and index."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import pipeline.storage as storage
from pipeline.errors import BuildError
from pipeline.manifest import Manifest, ShardRecord
from pipeline.storage import Location
from pipeline.wds_format import file_sha256, index_of_tar, index_path, read_members


def verify_shard(out: Location, record: ShardRecord) -> list[str]:
    """Problems found in one shard: checksum, index, sample structure, undecodable images. A shard
    in a bucket is read whole into a temporary file."""
    tar = storage.join(out, record.name)
    if not storage.exists(tar):
        return ["missing"]
    with storage.local_copy(tar) as local:
        return _check_copy(local, index_path(str(tar)), record)


def _check_copy(tar: Path, index: str, record: ShardRecord) -> list[str]:
    problems = []
    if tar.stat().st_size != record.bytes or file_sha256(tar) != record.sha256:
        problems.append("size or sha256 differs from the manifest")
    try:
        samples = _check_members(tar, index, problems)
    # cut or overwritten: the rest cannot be read
    except (tarfile.TarError, OSError, EOFError) as err:
        return [
            *problems,
            f"not a readable tar ({err or type(err).__name__}): rebuild it (rerun the build "
            "command)",
        ]
    if samples != record.samples:
        problems.append(f"{samples} images, manifest says {record.samples}")
    return problems


def _check_members(tar: Path, index: str, problems: list[str]) -> int:
    """Adds the index's and the images' problems; returns the number of images. Raises on an
    unreadable tar."""
    if not storage.exists(index) or storage.read_text(index) != index_of_tar(tar):
        problems.append("index file missing or does not match the tar")
    samples = 0
    for info, data in read_members(tar):
        if not info.name.endswith(".jpg"):
            continue
        samples += 1
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as err:
            problems.append(f"{info.name}: does not decode ({err})")
    return samples


def verify(out: Location, split: str) -> int:
    """Checks every shard of `split` in `out`, printing each problem; returns the number of damaged
    shards."""
    manifest_path = Manifest.path(out, split)
    if not storage.exists(manifest_path):
        raise BuildError(f"{manifest_path} not found: nothing to verify")
    manifest = Manifest.load(manifest_path)
    bad = 0
    for record in tqdm(manifest.shards, unit="shard", desc=f"verify {split}"):
        problems = verify_shard(out, record)
        bad += bool(problems)
        for problem in problems:
            print(f"{record.name}: {problem}", file=sys.stderr)
    print(
        f"{split}: {len(manifest.shards) - bad} of {len(manifest.shards)} shards OK, "
        f"{manifest.samples} samples"
    )
    return bad
