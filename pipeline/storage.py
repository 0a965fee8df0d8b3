"""Where shards live, a local folder or an S3 prefix (`s3://bucket/prefix`), behind one set of
functions: the rest of maeflow reads and writes shard files through them and never asks which.

A location is a `Path` (or a path string) on a file system, or an `s3://bucket/key` string. Object
storage has no folders: a "folder" is a key prefix, and `listing` names the objects right under it.

S3 requests go through boto3, which finds credentials, region and endpoint as every AWS tool does
(the environment, `~/.aws/config` and `~/.aws/credentials`, `AWS_PROFILE`; `AWS_ENDPOINT_URL` for an
S3-compatible store such as MinIO or Ceph); none of them is ever in maeflow's config or logs. DALI's
reader reads tars from the same places with its own AWS SDK, which takes the same settings. Every
request is bounded: a connection that does not open within `CONNECT_TIMEOUT_S`, or a response that
stalls for `READ_TIMEOUT_S`, is tried `ATTEMPTS` times in all (AWS_MAX_ATTEMPTS overrides it; the
SDK's standard mode: exponential backoff with jitter) and then raised as a `StorageError` naming the
URL and the cause.
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_text
from pipeline.errors import StorageError

Location = str | Path

SCHEME = "s3://"
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
ATTEMPTS = 5
# Parts of a large transfer: a 1 GiB shard goes up (or down) as 16 parts, 8 at a time.
PART_BYTES = 64 * 2**20
PARALLEL_PARTS = 8
DIGEST_KEY = "sha256"  # the object metadata an upload records its content's digest under


def is_remote(location: Location) -> bool:
    return str(location).startswith(SCHEME)


def join(folder: Location, name: str) -> Location:
    """The location of `name` inside `folder`, of the folder's kind."""
    if is_remote(folder):
        return f"{str(folder).rstrip('/')}/{name}"
    return Path(folder) / name


def name_of(location: Location) -> str:
    return posixpath.basename(str(location)) if is_remote(location) else Path(location).name


def parent_of(location: Location) -> Location:
    if is_remote(location):
        return posixpath.dirname(str(location))
    return Path(location).parent


@dataclass(frozen=True)
class Stored:
    """What the store says of one file: its size, and the digest its upload recorded (objects that
    maeflow uploaded; None for local files, whose digest is computed from their bytes)."""

    bytes: int
    sha256: str | None = None


def _bucket_key(url: str) -> tuple[str, str]:
    bucket, _, key = str(url)[len(SCHEME):].partition("/")
    return bucket, key


def attempts() -> int:
    """Tries per request: AWS_MAX_ATTEMPTS where the environment sets it, as the AWS tools take it,
    else `ATTEMPTS`."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "")
    return int(value) if value.isdigit() and int(value) > 0 else ATTEMPTS


def _client() -> Any:
    """The S3 client for the endpoint and retries the environment names now."""
    return _client_for(os.environ.get("AWS_ENDPOINT_URL"), attempts())


@functools.cache
def _client_for(endpoint: str | None, tries: int) -> Any:
    """One S3 client per endpoint, retry budget and process (boto3's clients are thread-safe; a
    worker process makes its own)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:
        raise StorageError(f"s3:// locations need boto3 ({err}): pip install boto3") from None
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": tries, "mode": "standard"},
        max_pool_connections=32,
    )
    return boto3.session.Session().client("s3", config=config)


@contextmanager
def _requests(url: str) -> Iterator[None]:
    """S3's errors as one StorageError line naming `url` and the cause; a missing object as
    FileNotFoundError."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except S3UploadFailedError as err:  # the transfer manager's wrapper of the error that ended it
        raise StorageError(f"{url}: upload failed: {err}") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(f"{url} does not exist") from None
        if code == "NoSuchBucket":
            raise StorageError(f"{url}: bucket {_bucket_key(url)[0]} does not exist") from None
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                     "SignatureDoesNotMatch", "ExpiredToken"):
            raise StorageError(
                f"{url}: access denied ({code}): check the credentials (AWS_ACCESS_KEY_ID, "
                "AWS_PROFILE, ~/.aws/credentials) and the bucket's policy"
            ) from None
        raise StorageError(f"{url}: {code or status}: {err}") from None
    except NoCredentialsError:
        raise StorageError(
            f"{url}: no AWS credentials found (environment, AWS_PROFILE, ~/.aws/credentials)"
        ) from None
    except BotoCoreError as err:  # an endpoint that cannot be reached or stays silent
        raise StorageError(f"{url}: {err} (after {attempts()} attempts)") from None


def listing(folder: Location) -> dict[str, int]:
    """The files right inside `folder`, name -> size, read in one listing (a few requests per
    thousand objects); empty where the folder does not exist."""
    if not is_remote(folder):
        try:
            return {e.name: e.stat().st_size for e in os.scandir(folder or ".") if e.is_file()}
        except OSError:
            return {}
    url = str(folder).rstrip("/")
    bucket, prefix = _bucket_key(url)
    prefix = f"{prefix}/" if prefix else ""
    found: dict[str, int] = {}
    with _requests(url):
        pages = _client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/"
        )
        for page in pages:
            for item in page.get("Contents", []):
                found[item["Key"][len(prefix):]] = item["Size"]
    return found


def stored(location: Location) -> Stored | None:
    """The file's size and recorded digest, or None where it does not exist."""
    if not is_remote(location):
        path = Path(location)
        return Stored(path.stat().st_size) if path.is_file() else None
    bucket, key = _bucket_key(str(location))
    try:
        with _requests(str(location)):
            head = _client().head_object(Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    return Stored(head["ContentLength"], head.get("Metadata", {}).get(DIGEST_KEY))


def exists(location: Location) -> bool:
    return stored(location) is not None


def read_bytes(location: Location, offset: int = 0, size: int | None = None) -> bytes:
    """`size` bytes from `offset` on (to the end where `size` is None): one ranged GET from a
    bucket. FileNotFoundError where the file does not exist."""
    if not is_remote(location):
        with open(location, "rb") as f:
            f.seek(offset)
            return f.read() if size is None else f.read(size)
    if size == 0:
        return b""
    bucket, key = _bucket_key(str(location))
    whole = offset == 0 and size is None  # no Range: an empty object has no byte 0 to range from
    last = "" if size is None else offset + size - 1
    ranged = {} if whole else {"Range": f"bytes={offset}-{last}"}
    with _requests(str(location)):
        return _client().get_object(Bucket=bucket, Key=key, **ranged)["Body"].read()


def read_text(location: Location) -> str:
    return read_bytes(location).decode()


def write_text(location: Location, text: str) -> None:
    """A complete file or none: atomic on a file system, as every S3 PUT is."""
    if not is_remote(location):
        atomic_write_text(location, text)
        return
    bucket, key = _bucket_key(str(location))
    with _requests(str(location)):
        _client().put_object(Bucket=bucket, Key=key, Body=text.encode())


def upload(local: Path, location: str, sha256: str) -> None:
    """Puts a finished local file at `location` with its digest recorded, in parts where it is
    large; the object appears whole when the last part is in, or not at all."""
    bucket, key = _bucket_key(location)
    with _requests(location):
        _client().upload_file(
            str(local), bucket, key, ExtraArgs={"Metadata": {DIGEST_KEY: sha256}},
            Config=_transfer(),
        )


def _transfer() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
        max_concurrency=PARALLEL_PARTS,
    )


def download(location: str, local: Path) -> None:
    """The whole object into a local file: one GET, or parallel ranged GETs of `PART_BYTES` where
    it is large."""
    bucket, key = _bucket_key(location)
    with _requests(location):
        _client().download_file(bucket, key, str(local), Config=_transfer())


@contextmanager
def local_copy(location: Location) -> Iterator[Path]:
    """The file as a local path: itself on a file system, a temporary download of an object."""
    if not is_remote(location):
        yield Path(location)
        return
    folder = Path(tempfile.mkdtemp(prefix="maeflow-copy-"))
    try:
        path = folder / name_of(location)
        download(str(location), path)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)

