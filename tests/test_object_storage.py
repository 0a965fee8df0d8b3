"""Shards in an S3 bucket, against a real S3-compatible server (moto's, from the test extras) that
the tests start on 127.0.0.1 in its own process and stop: built into the bucket, verified there,
read by both backends as the same shards on disk are read, and every way a bucket can fail named in
one line."""

import json
import socket

import boto3
import pytest
import torch

import pipeline.storage as storage
from bench.s3_server import local_s3
from pipeline.build_shards import main as build_main
from pipeline.errors import DamagedIndex, StorageError
from pipeline.loader import build_loader
from pipeline.manifest import Manifest
from tests.runs import metrics, run, samples_read
from train.pretrain import main as pretrain_main

BUCKET = "maeflow-test"


@pytest.fixture(scope="module")
def s3():
    """The server, and this process's AWS settings pointing at it (a failing request is tried
    twice)."""
    with local_s3() as server, pytest.MonkeyPatch.context() as env:
        for key, value in {**server.env, "AWS_MAX_ATTEMPTS": "2"}.items():
            env.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield server


def build_into(url: str, shards, staging, split: str = "train") -> int:
    """`shards`' own build command (tests.runs.make_sample_shards) with OUT a bucket."""
    extra = ["--classes", str(shards / "train.json")] if split == "val" else []
    return build_main([str(shards.parent / "images" / split), url, "--split", split,
                       "--shard-size-mb", "0.5", "--workers", "1", "--quiet",
                       "--staging", str(staging), *extra])


@pytest.fixture(scope="module")
def built(s3, shards, tmp_path_factory) -> str:
    """The module's sample shards built again, straight into the bucket."""
    url = f"s3://{BUCKET}/built"
    staging = tmp_path_factory.mktemp("staging")
    for split in ("train", "val"):
        assert build_into(url, shards, staging, split) == 0
    return url


def copy_to(url: str, shards, leave_out: tuple[str, ...] = ()) -> str:
    """The shard folder's files uploaded under `url` as they are, but `leave_out`."""
    client = boto3.client("s3")
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    for path in shards.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.name not in leave_out:
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return url


def test_a_build_into_a_bucket_writes_what_a_build_into_a_folder_writes(built, shards, tmp_path):
    local = {p.name: p for p in shards.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert storage.listing(built) == {name: p.stat().st_size for name, p in local.items()}
    for name, path in local.items():
        assert storage.read_bytes(f"{built}/{name}") == path.read_bytes(), name
    # each upload records its digest, which a rerun checks
    for record in Manifest.load(f"{built}/train.json").shards:
        assert storage.stored(f"{built}/{record.name}").sha256 == record.sha256
    assert build_main(["--verify", built]) == 0


def test_the_staging_folder_keeps_no_shard_once_it_is_uploaded(s3, shards, tmp_path):
    staging = tmp_path / "staging"
    assert build_into(f"s3://{BUCKET}/staged", shards, staging) == 0
    assert not list(staging.glob("*.tar")) and not list(staging.glob("*.idx"))
    assert (staging / ".train.progress.jsonl").is_file()


def read_all(where: str, backend: str, epochs: int = 2) -> list[tuple]:
    """(keys, images, labels) of every batch rank 1 of 2 reads in `epochs` training epochs."""
    batches = []
    with build_loader(where, backend=backend, local_batch_size=4, img_size=16, rank=1,
                      world_size=2, device="cpu", num_threads=1, window_shards=1) as loader:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for i, (images, labels) in enumerate(loader):
                batches.append((loader.batch_keys(i), images, labels))
    return batches


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_a_rank_reads_a_bucket_as_it_reads_the_same_shards_on_disk(built, shards, s3, backend):
    s3.stats(reset=True)
    remote = read_all(built, backend)
    requests = s3.stats()["requests"]
    local = read_all(str(shards), backend)
    assert len(remote) == len(local) == 16  # 2 epochs of 8 batches
    for (keys, images, labels), (local_keys, local_images, local_labels) in zip(
        remote, local, strict=True
    ):
        assert keys == local_keys
        assert torch.equal(images, local_images) and torch.equal(labels, local_labels)
    if backend == "dali":
        # Whole shards, not an image at a time: 64 images from 3 shards, each fetched for each
        # window that reads it (5 windows, the next epoch's first built ahead), with one listing,
        # the manifest and the 3 indexes.
        assert requests["GET"] <= 5 * 3 + 5, requests


def test_a_killed_build_into_a_bucket_keeps_its_finished_uploads_and_redoes_the_rest(
    s3, shards, tmp_path, capsys
):
    url, staging = f"s3://{BUCKET}/killed", tmp_path / "staging"
    assert build_into(url, shards, staging) == 0
    first = storage.read_text(f"{url}/train.json")
    client = boto3.client("s3")
    # Killed before the manifest, one shard's upload never done, another's object replaced by other
    # bytes of the same length (an upload of another build): both are redone, the third kept.
    client.delete_object(Bucket=BUCKET, Key="killed/train.json")
    client.delete_object(Bucket=BUCKET, Key="killed/train-000000.tar")
    size = storage.stored(f"{url}/train-000001.tar").bytes
    client.put_object(Bucket=BUCKET, Key="killed/train-000001.tar", Body=b"x" * size,
                      Metadata={"sha256": "0" * 64})
    capsys.readouterr()
    assert build_into(url, shards, staging) == 0
    assert "resuming: 1 of 3 shards already complete, 2 to write" in capsys.readouterr().out
    assert storage.read_text(f"{url}/train.json") == first
    assert build_main(["--verify", url]) == 0
    # Without the staging folder that holds its progress, the bucket's shards are not taken for
    # this build's.
    client.delete_object(Bucket=BUCKET, Key="killed/train.json")
    assert build_into(url, shards, tmp_path / "elsewhere") == 2
    assert "pass its --staging" in capsys.readouterr().err


def test_verify_names_a_damaged_shard_in_a_bucket(s3, shards, capsys):
    url = copy_to(f"s3://{BUCKET}/damaged", shards)
    data = bytearray((shards / "train-000002.tar").read_bytes())
    data[3000:3100] = bytes(100)  # inside the first image
    boto3.client("s3").put_object(Bucket=BUCKET, Key="damaged/train-000002.tar", Body=bytes(data))
    assert build_main(["--verify", url]) == 5
    err = capsys.readouterr().err
    assert "train-000002.tar: size or sha256 differs from the manifest" in err
    assert "train-000000.tar" not in err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refusal(capsys, data: str, tmp_path) -> str:
    """The one line `pretrain.py --data DATA` refuses with (exit 2), nothing trained."""
    argv = ["--config", "configs/tiny.toml", "--data", data, "--output", str(tmp_path / "run")]
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    return err


def test_a_bucket_that_cannot_serve_is_refused_in_one_line_naming_the_url(
    s3, shards, tmp_path, capsys, monkeypatch
):
    assert "s3://no-such-bucket/x: bucket no-such-bucket does not exist" in refusal(
        capsys, "s3://no-such-bucket/x", tmp_path
    )
    assert f"s3://{BUCKET}/nothing/train.json not found (splits here: none)" in refusal(
        capsys, f"s3://{BUCKET}/nothing", tmp_path
    )
    url = copy_to(f"s3://{BUCKET}/no_index", shards, leave_out=("train-000001.idx",))
    assert f"index file {url}/train-000001.idx is missing" in refusal(capsys, url, tmp_path)
    url = copy_to(f"s3://{BUCKET}/no_shard", shards, leave_out=("train-000002.tar",))
    assert f"{url}/train.json lists 1 shard(s) that are missing: {url}/train-000002.tar" in (
        refusal(capsys, url, tmp_path)
    )
    with monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
        assert "Could not connect to the endpoint URL" in refusal(capsys, url, tmp_path)


def test_credentials_the_store_refuses_are_named_as_such(shards, tmp_path, capsys, monkeypatch):
    # A server that checks every request's signature after the first (the bucket's creation).
    with local_s3(env={"INITIAL_NO_AUTH_ACTION_COUNT": "1"}) as checking:
        for key, value in checking.env.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        err = refusal(capsys, f"s3://{BUCKET}/shards", tmp_path)
        assert f"s3://{BUCKET}/shards: access denied (InvalidAccessKeyId)" in err
        assert "maeflow-test" not in err.replace(BUCKET, "")  # the key itself is never printed


def test_a_shard_shorter_than_its_index_is_named_while_reading(s3, shards):
    url = copy_to(f"s3://{BUCKET}/short", shards)
    data = (shards / "train-000001.tar").read_bytes()
    boto3.client("s3").put_object(Bucket=BUCKET, Key="short/train-000001.tar", Body=data[:-4096])
    with pytest.raises(DamagedIndex, match=f"{url}/train-000001.tar: .* bytes, but its index"):
        read_all(url, "dali")


def test_a_bucket_that_stops_answering_mid_epoch_ends_the_reading_in_bounded_time(
    shards, monkeypatch
):
    with local_s3() as dying:
        for key, value in {**dying.env, "AWS_MAX_ATTEMPTS": "2"}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        url = copy_to(f"s3://{BUCKET}/dying", shards)
        loader = build_loader(url, local_batch_size=4, img_size=16, rank=1, world_size=2,
                              device="cpu", num_threads=1, window_shards=1)
        with loader, pytest.raises(StorageError, match=f"{url}/train-0000.*Could not connect"):
            for epoch in range(3):
                loader.set_epoch(epoch)
                for _ in loader:
                    dying.stop()  # after the first batch: later windows fetch their shards


@pytest.mark.slow
def test_a_two_rank_run_on_a_bucket_stops_and_resumes_exactly_as_on_disk(s3, built, shards,
                                                                          tmp_path):
    """The same run on the bucket's shards, stopped mid-window and resumed, reads the samples the
    uninterrupted run on disk reads, in the same order, and computes the same losses."""
    common = ("--log-every", "1", "--set", "optim.local_batch_size=4", "--set",
              "log.sample_ids=true", "--set", "data.window_shards=1")
    on_disk = tmp_path / "disk"
    run(shards, on_disk, "--max-steps", "10", *common)
    on_bucket = tmp_path / "bucket"
    env = {**s3.env, "AWS_MAX_ATTEMPTS": "2"}
    before = storage.listing(built)
    run(built, on_bucket, "--max-steps", "6", *common, env=env)  # epoch 1, mid-window
    run(built, on_bucket, "--max-steps", "10", "--resume", *common, env=env)
    read = samples_read(on_bucket, range(1, 11))
    assert len(read) == 10 * 16 and read == samples_read(on_disk, range(1, 11))
    losses = [r["loss"] for r in metrics(on_bucket)]
    assert len(losses) == 10 and losses == [r["loss"] for r in metrics(on_disk)]
    resumed = [json.loads(line) for line in (on_bucket / "metrics.jsonl").read_text().splitlines()
               if '"resumed"' in line]
    assert resumed and resumed[0]["from"] == "step00000006"
    assert storage.listing(built) == before  # a run writes nothing into the bucket

