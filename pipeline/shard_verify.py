"""`--verify`: re-read every shard of a split and check it against its manifest and index."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.errors import BuildError
from pipeline.manifest import Manifest, ShardRecord
from pipeline.wds_format import file_sha256, index_of_tar, index_path, read_members


def verify_shard(out: Path, record: ShardRecord) -> list[str]:
    """Problems found in one shard: checksum, index, sample structure, undecodable images."""
    tar = out / record.name
    if not tar.is_file():
        return ["missing"]
    problems = []
    if tar.stat().st_size != record.bytes or file_sha256(tar) != record.sha256:
        problems.append("size or sha256 differs from the manifest")
    try:
        samples = _check_members(tar, problems)
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


def _check_members(tar: Path, problems: list[str]) -> int:
    """Adds the index's and the images' problems; returns the number of images. Raises on an
    unreadable tar."""
    idx = index_path(tar)
    if not idx.is_file() or idx.read_text() != index_of_tar(tar):
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


def verify(out: Path, split: str) -> int:
    """Checks every shard of `split` in `out`, printing each problem; returns the number of damaged
    shards."""
    manifest_path = Manifest.path(out, split)
    if not manifest_path.is_file():
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
