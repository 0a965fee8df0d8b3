"""Images inside the containers users download, listed once and read by offset, never extracted.

An `Entry` is one file of the input: its name (a POSIX path inside the container, or relative to a
folder), where its bytes are (the file that holds it, and an offset there), and, for a zip member,
how it is packed. Listing reads headers only; a worker then reads each image with one seek, in
parallel, so building from an archive runs as fast as from the same files extracted, with memory
independent of the archive's size.

- plain tar (ImageNet's `ILSVRC2012_img_train.tar`, whose members are per-class tars, or any tar of
images):
  members of an inner tar lie at the outer member's offset plus their own, so they are read in place
  too;
- zip (the Kaggle ImageNet download, or any zip of images): the central directory gives each
member's local
  header; a stored member is read as is, a deflated one inflated (zlib), member by member;
- .tar.gz / .tgz: gzip cannot seek, so it costs one sequential pass that writes the uncompressed tar
to a
  temporary file in the output folder (disk equal to the archive's uncompressed size, removed when
  the build ends; memory stays bounded), which is then read as a plain tar.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import shutil
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.shard_reports import Reports

ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature ... name length, extra length
TAR_SUFFIXES = (".tar",)
GZIP_SUFFIXES = (".tar.gz", ".tgz")


class ArchiveError(Exception):
    """An archive that cannot be listed at all (the message names it and why)."""


@dataclass(frozen=True)
class Entry:
    name: str
    """POSIX path inside the container ("n01440764/n01440764_10026.JPEG")"""
    path: str
    """the file holding its bytes"""
    size: int
    """its bytes, uncompressed"""
    offset: int = -1
    """where its bytes start in `path` (-1: the whole file); for a zip member, its local header"""
    packed_size: int = 0
    """a zip member's compressed size (0: not a zip member)"""
    method: int = 0
    """a zip member's compression: 0 stored, 8 deflated"""
    problem: str = ""
    """why it cannot be an image ("a link", "an unsafe name", "cut short"); reported, never read"""

    def row(self) -> list:
        """The entry as a JSON row, for the builder's scratch files (a listed entry has no
        problem)."""
        return [self.name, self.path, self.size, self.offset, self.packed_size, self.method]

    @classmethod
    def from_row(cls, row: list) -> Entry:
        return cls(*row)


def read_entry(entry: Entry, head: int | None = None) -> bytes:
    """The entry's bytes (its first `head` bytes, when given); OSError when the container is cut
    short or damaged there."""
    wanted = entry.size if head is None else min(head, entry.size)
    with open(entry.path, "rb") as f:
        f.seek(max(entry.offset, 0))
        if not entry.packed_size:
            data = f.read(wanted)
        else:
            header = ZIP_LOCAL_HEADER.unpack(f.read(ZIP_LOCAL_HEADER.size))
            if header[0] != b"PK\x03\x04":
                raise OSError("no zip member header where the central directory says")
            f.seek(header[9] + header[10], 1)
            packed = f.read(entry.packed_size)
            data = packed[:wanted] if entry.method == zipfile.ZIP_STORED else \
                zlib.decompressobj(-15).decompress(packed, wanted)
    if len(data) != wanted:
        raise OSError(f"the archive ends inside this member ({len(data)} of {entry.size} bytes)")
    return data


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith(TAR_SUFFIXES + GZIP_SUFFIXES) or name.endswith(".zip"))


def unsafe_name(name: str) -> str:
    """Why a member name cannot be used as a sample's path ("" when it can)."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute member name"
    if ".." in name.split("/"):
        return "a member name that leaves the archive (..)"
    return ""


def tar_archive_entries(archive: Path, scratch: Path, problems: Reports) -> Iterator[Entry]:
    """Every file member of a tar or .tar.gz (members of inner tars expanded, named "<inner
    stem>/<name>"), streamed; the problems met listing it ({"path", "reason"}) go to `problems`. (A
    zip: `zip_entries`.)"""
    if archive.name.lower().endswith(GZIP_SUFFIXES):
        return tar_entries(ungzipped(archive, scratch), archive.name, problems)
    return tar_entries(archive, archive.name, problems)


def ungzipped(archive: Path, scratch: Path) -> Path:
    """The tar inside a .tar.gz, written once to `scratch` (one sequential pass; reused by a
    rerun)."""
    target = scratch / f"{archive.name}.tar"
    if target.is_file() and target.stat().st_mtime >= archive.stat().st_mtime:
        return target
    scratch.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with gzip.open(archive, "rb") as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 22)
    # cut short: keep what came out whole, the tar listing reports the rest
    except (OSError, EOFError) as err:
        if not partial.is_file() or partial.stat().st_size == 0:
            raise ArchiveError(f"{archive}: not a readable gzip file ({err})") from None
    partial.replace(target)
    return target


def tar_entries(tar_path: Path, display: str, problems: Reports, base: int = 0, fileobj=None,
                prefix: str = "") -> Iterator[Entry]:
    """File members of a plain tar (at `base` inside `tar_path` when it is an inner tar), inner tars
    expanded, streamed as its headers are read. A tar that cannot be opened at all raises
    ArchiveError at once."""
    try:
        tar = tarfile.open(tar_path if fileobj is None else None, mode="r:", fileobj=fileobj)  # noqa: SIM115
    except (tarfile.TarError, OSError) as err:
        raise ArchiveError(f"{display}: not a readable tar ({err})") from None
    return _tar_members(tar, tar_path, display, problems, base, prefix)


def _tar_members(tar: tarfile.TarFile, tar_path: Path, display: str, problems: Reports, base: int,
                 prefix: str) -> Iterator[Entry]:
    end = Path(tar_path).stat().st_size
    members, first_cut = 0, ""
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError) as err:
                problems.append(
                    {
                        "path": display,
                        "reason": f"the tar ends early or is damaged after {members} "
                        f"members ({err}): later members are missing",
                    }
                )
                break
            if info is None:
                break
            # TarFile keeps every header it reads: a million-member tar would hold them all
            tar.members.clear()
            name = prefix + (info.name[2:] if info.name.startswith("./") else info.name)
            if info.isdir():
                members += 1
                yield Entry(name.rstrip("/") + "/", str(tar_path), 0, problem="a folder")
                continue
            if info.issym() or info.islnk():
                problems.append({"path": name, "reason": "a link, not a file: skipped"})
                continue
            if not info.isfile():
                continue
            offset = base + info.offset_data
            unsafe = unsafe_name(info.name)
            # an inner tar, whose whole members count even if cut
            if info.name.lower().endswith(".tar") and not unsafe:
                members += 1
                yield from _inner_tar(tar, info, tar_path, offset, name[:-4] + "/", problems)
                continue
            problem = unsafe or ("cut short" if offset + info.size > end else "")
            first_cut = first_cut or (name if problem == "cut short" else "")
            members += 1
            yield Entry(name, str(tar_path), info.size, offset, problem=problem)
    if first_cut:
        problems.append(
            {
                "path": display,
                "reason": f"the tar is cut short inside {first_cut}: the members after it "
                "are missing",
            }
        )


def _inner_tar(outer: tarfile.TarFile, info: tarfile.TarInfo, tar_path: Path, offset: int,
               prefix: str, problems: Reports) -> Iterator[Entry]:
    """An inner tar's members, named "<inner stem>/<name>"; a damaged inner tar is reported, its
    class kept."""
    yield Entry(prefix, str(tar_path), 0, problem="a folder")
    try:
        members = tar_entries(
            tar_path,
            info.name,
            problems,
            base=offset,
            fileobj=outer.extractfile(info),
            prefix=prefix,
        )
    except ArchiveError as err:
        problems.append({"path": info.name, "reason": str(err).removeprefix(f"{info.name}: ")})
        return
    yield from members


def zip_entries(archive: Path, problems: Reports) -> list[Entry]:
    """A zip's members, from its central directory (which zipfile holds in memory whole)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ArchiveError(f"{archive.name}: not a readable zip ({err})") from None
    entries = []
    for info in infos:
        if info.is_dir():
            entries.append(Entry(info.filename, str(archive), 0, problem="a folder"))
            continue
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problems.append(
                {
                    "path": info.filename,
                    "reason": f"compression {info.compress_type} is not supported",
                }
            )
            continue
        entries.append(Entry(info.filename, str(archive), info.file_size, info.header_offset,
                             packed_size=max(info.compress_size, 1), method=info.compress_type,
                             problem=unsafe_name(info.filename)))
    return entries


def folder_entries(folder: Path, depth: int | None, under: str = "") -> Iterator[Entry]:
    """Files under `folder`, named relative to it (and its folders, as entries whose problem is "a
    folder"): only `class/file` when `depth` is 2, any depth when None. Hidden files and folders are
    left out. One folder's listing at a time, in name order."""
    with os.scandir(folder) as listing:
        children = sorted(
            (child.name, child.is_dir(), child.is_symlink(), child.path)
            for child in listing
            if not child.name.startswith(".")
        )
    for name, is_dir, is_link, path in children:
        rel = under + name
        if is_dir:
            yield Entry(rel + "/", path, 0, problem="a folder")
            # A linked class folder is read (a subset made of links); a walk at any depth does not
            # follow links, which could lead it round in a circle.
            if (not is_link) if depth is None else depth > 1:
                yield from folder_entries(
                    Path(path), None if depth is None else depth - 1, rel + "/"
                )
        elif os.path.isfile(path):
            yield Entry(rel, path, os.stat(path).st_size)


def basename(name: str) -> str:
    return posixpath.basename(name.rstrip("/"))
