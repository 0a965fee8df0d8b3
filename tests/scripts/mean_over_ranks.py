"""One of two gloo ranks that checks what the ranks average: `python mean_over_ranks.py` under
RANK/WORLD_SIZE/MASTER_*. Each rank's gradients and losses are its rank + 1 times a common value;
it prints one JSON line: the gradients `OverlappedAllReduce` leaves (fp32 and bf16 buckets), the
loss `MetricWindow` logs, the first non-finite step of a window where one rank diverged, and what
`StepVote` decides from a stop that one rank saw."""

import json

import torch
import torch.distributed as dist
from torch import nn

from train.distributed import StepVote
from train.grad_reduce import OverlappedAllReduce
from train.metrics import MetricWindow


def reduced(model: nn.Module, forward: nn.Module, inputs: torch.Tensor, dtype: torch.dtype) -> None:
    """One armed backward pass of `forward`'s summed output, its gradients reduced over the ranks
    into `model`'s."""
    reduce = OverlappedAllReduce(model, None, dtype, bucket_bytes=16)  # several buckets
    reduce.arm()
    forward(inputs).sum().backward()
    reduce.finish()
    reduce.close()


dist.init_process_group("gloo")
scale = dist.get_rank() + 1
grads = {}
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)  # the same weights on both ranks
    reduced(model, model, torch.full((1, 3), float(scale)), dtype)
    grads[str(dtype)] = [p.grad.flatten().tolist() for p in model.parameters()]

# a parameter no rank's backward pass reached: a zero gradient, as every rank's optimizer expects
torch.manual_seed(0)
partly_used = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
reduced(partly_used, partly_used["used"], torch.ones(1, 3), torch.float32)
unused = [None if p.grad is None else p.grad.abs().sum().item()
          for p in partly_used["unused"].parameters()]

window = MetricWindow(torch.device("cpu"))
for _ in range(2):  # two forward passes in the window
    window.add(torch.tensor(float(scale)), step=1)
loss, bad_step = window.reduce()
window.restart(0.0)
for step in (2, 3, 4):  # rank 1's loss goes non-finite at step 3, rank 0's never
    window.add(torch.tensor(float("nan") if scale == 2 and step >= 3 else 1.0), step)
_, diverged_at = window.reduce()
vote = StepVote(None, 2)  # (stop, checkpoint by the clock): a stop seen on rank 1 alone
decided = [vote.cast(scale == 2, False), vote.cast(False, False)]
vote.close()
print(json.dumps(
    {"grads": grads, "loss": loss, "bad_step": bad_step, "diverged_at": diverged_at,
     "decided": decided, "unused": unused}
))
dist.destroy_process_group()
