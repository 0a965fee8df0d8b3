"""A task file with a failure inside its step, as a user's task is written: MAE pre-training whose
loss, at one step on one rank, meets what MAEFLOW_TEST_FAILURE names ("RANK:STEP:KIND"), each raised
as it really is raised: a shape error by torch, an allocation no host can serve, a damaged image as
the loader reports one, a read from a bucket whose endpoint stopped answering (a port nothing
listens on), a write to a full disk (/dev/full, which the kernel answers with ENOSPC)."""

import contextlib
import os
import socket
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent.parent)

import torch  # noqa: E402

from pipeline import storage  # noqa: E402
from pipeline.errors import DamagedImage  # noqa: E402
from train import launch  # noqa: E402
from train.mae_task import MaeTask  # noqa: E402


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on leaving: nothing listens there


@contextlib.contextmanager
def environment(**values: str):
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def fail(kind: str, images: torch.Tensor) -> None:
    if kind == "bug":
        images.flatten(1) @ torch.ones(3, 3)
    elif kind == "memory":
        torch.empty(2**50, dtype=torch.uint8)
    elif kind == "data":
        raise DamagedImage(
            "train-000002.tar: sample 000000123 does not decode (broken data stream)"
        )
    elif kind == "storage":
        with environment(AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}", AWS_MAX_ATTEMPTS="2",
                      AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_REGION="us-east-1"):
            storage.read_bytes("s3://shards/train-000002.tar", 512, 1024)
    elif kind == "disk":
        with open("/dev/full", "wb") as full:
            full.write(b"a step's record")
            full.flush()


class FailingTask(MaeTask):
    name = "MAE pre-training with a failure in its step"

    def loss(self, engine, images, labels, micro):
        rank, step, kind = os.environ["MAEFLOW_TEST_FAILURE"].split(":")
        if self.ctx.rank == int(rank) and micro.step == int(step):
            fail(kind, images)
        return super().loss(engine, images, labels, micro)


if __name__ == "__main__":
    sys.exit(launch.main(FailingTask))
