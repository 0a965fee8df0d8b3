"""One rank of a real trainer run whose gradient reduction is counted: `python reduction_ranks.py
OUTPUT PRECISION` under RANK/WORLD_SIZE/MASTER_*. The tiny MAE on synthetic data, 3 optimizer steps
of 2 micro-steps each, 1 MB buckets. Every rank prints one JSON line: per optimizer step, what it
all-reduced (dtype, elements) and, for the first all-reduce of the step, in which micro-step's
backward pass it was sent and how many operators that backward pass still ran after it; and the
elements of the trainable parameters."""

import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train.config import load_config
from train.mae_task import MaeTask
from train.trainer import Trainer

os.environ["MAE_KERNELS"] = "torch"
output, precision = sys.argv[1], sys.argv[2]
cfg = load_config(
    "tiny",
    [
        "data.backend=synthetic",
        "data.synthetic_samples=512",
        f"output={output}",
        "max_steps=3",
        "log.log_every=3",
        "checkpoint.at_end=false",
        "eval.every_epochs=0",
        "log.viz_every=100",
        "log.tensorboard=false",
        f"runtime.precision={precision}",
        "optim.grad_accum_steps=2",
        "runtime.reduce_bucket_mb=1",
    ],
)
steps: list[dict] = []
# phase: backward, or after it up to engine.step
where = {"phase": None, "micro": None, "ops_after_send": None}


def is_vote(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.int32 and tensor.numel() == 2


class Counted(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.c10d.allreduce_ and where["phase"] is not None:
            step = steps[-1]
            step["reduced"].append([str(args[0][0].dtype), args[0][0].numel()])
            if step["first_sent_in_micro_step"] is None:
                step["first_sent_in_micro_step"] = (
                    where["micro"] if where["phase"] == "backward" else "after"
                )
                where["ops_after_send"] = 0
        elif where["phase"] == "backward" and where["ops_after_send"] is not None:
            where["ops_after_send"] += 1
        return func(*args, **(kwargs or {}))


with Trainer(cfg, MaeTask, None) as trainer:
    backward, step, micro = trainer.engine.backward, trainer.engine.step, iter(range(10**6))

    def counted_backward(loss):
        index = next(micro) % 2
        if index == 0:
            steps.append(
                {"reduced": [], "first_sent_in_micro_step": None, "ops_after_first_send": None}
            )
        where.update(phase="backward", micro=index, ops_after_send=None)
        result = backward(loss)
        if where["ops_after_send"] is not None and steps[-1]["ops_after_first_send"] is None:
            steps[-1]["ops_after_first_send"] = where["ops_after_send"]
        where["phase"] = "after"
        return result

    def counted_step(*args, **kwargs):
        result = step(*args, **kwargs)
        where["phase"] = None
        return result

    trainer.engine.backward, trainer.engine.step = counted_backward, counted_step
    with Counted():
        assert trainer.fit() == 0
    parameters = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
print(json.dumps({"steps": steps, "parameters": parameters}))
