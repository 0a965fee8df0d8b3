"""The gradients' all-reduce of replicated training (ZeRO stage 0 over several ranks), overlapped
with the backward pass and in bf16 where the weights' gradients are only ever used for a bf16 step.

DeepSpeed's stage 0 flattens every gradient into fp32 buckets and reduces them after the backward
pass has ended, so that the network idles while the GPU computes and the GPU idles while the network
sends. Here, as in torch's DDP, a hook on each parameter fires once the accumulation's last backward
pass has added its gradient; a bucket whose gradients are all there is sent at once, asynchronously,
while the backward pass goes on with the earlier layers. Only the last wait, before the optimizer
step, can stall.

Under `autocast_bf16` the gradients are sent in bf16, each divided by the rank count before the sum
(torch's `bf16_compress_hook`): half the bytes of fp32, the dynamic range of fp32, the matmuls' own
precision. fp32 runs send fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    waiting: int = 0  # gradients not yet complete in this accumulation's last backward pass
    # (flat gradients, pending work)
    sent: tuple[torch.Tensor, Any] | None = field(default=None, repr=False)


class OverlappedAllReduce:
    """Gradient buckets all-reduced during the backward pass of each optimizer step's last
    micro-step.

    `arm()` before that backward pass, `finish()` after it and before the optimizer step: the
    gradients are then the ranks' mean, as DeepSpeed's own reduction leaves them. The earlier
    micro-steps only accumulate. `bucket_bytes`: DDP's default of 25 MB is large enough for a
    network's bandwidth and small enough that the first bucket leaves early in the backward pass."""

    def __init__(self, model: nn.Module, group: Any, dtype: torch.dtype, bucket_bytes: int) -> None:
        self.group, self.dtype = group, dtype
        self.world_size = dist.get_world_size(group)
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets: list[_Bucket] = []
        size = bucket_bytes  # the first parameter opens a bucket
        for param in reversed(params):  # the backward pass reaches the last layers first
            if size + param.numel() * dtype.itemsize > bucket_bytes and size:
                self.buckets.append(_Bucket([]))
                size = 0
            self.buckets[-1].params.append(param)
            size += param.numel() * dtype.itemsize
        self._bucket_of = {id(p): bucket for bucket in self.buckets for p in bucket.params}
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self.armed = False

    def arm(self) -> None:
        """The next backward pass is the accumulation's last: send each bucket as soon as it is
        complete."""
        for bucket in self.buckets:
            bucket.waiting, bucket.sent = len(bucket.params), None
        self.armed = True

    def _ready(self, param: nn.Parameter) -> None:
        if not self.armed:
            return
        bucket = self._bucket_of[id(param)]
        bucket.waiting -= 1
        if bucket.waiting == 0:
            self._send(bucket)

    def _send(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        flat = torch.cat([g.reshape(-1).to(self.dtype) for g in grads])
        flat.div_(self.world_size)  # before the sum: no bf16 overflow at any rank count
        bucket.sent = (flat, dist.all_reduce(flat, group=self.group, async_op=True))

    def finish(self) -> None:
        """Wait for every bucket (sending those a parameter without a gradient held back) and write
        the mean back."""
        for bucket in self.buckets:
            if bucket.sent is None:
                self._send(bucket)
        for bucket in self.buckets:
            flat, work = bucket.sent
            work.wait()
            for param, piece in zip(
                bucket.params, flat.split([p.numel() for p in bucket.params]), strict=True
            ):
                if param.grad is None:
                    param.grad = torch.empty_like(param)
                param.grad.copy_(piece.view_as(param))
            bucket.sent = None
        self.armed = False

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
