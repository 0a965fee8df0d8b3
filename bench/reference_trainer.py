"""The reference-style trainer: what a user runs without maeflow, kept here to measure against.

Written from the paper's recipe and common PyTorch practice, not from the reference code: plain DDP,
torch.autocast (bf16 on a GPU), torch's fused AdamW, the PIL DataLoader, and the reference
formulation of the model (repeat-index gathers, the unfused loss: MAE_KERNELS=torch; explicit
softmax attention: SDPA's math backend). Launch it as any DDP script:

    torchrun --nproc_per_node 8 -m bench.reference_trainer --config configs/vit_b16_1600ep.toml \
        --data SHARDS --output OUT --steps 100 --log-every 10 [--local-batch-size 256] [--workers
        16]

It appends {"step", "img_per_s", "data_stall_pct", "mfu"} lines to OUT/metrics.jsonl, as the trainer
does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from model.flops import mae_train_flops, peak_flops
from pipeline import build_loader
from train.config import load_config
from train.mae_task import mae_from_config
from train.recipe import build_optimizer, lr_at, peak_lr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reference_trainer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", required=True, help="a maeflow preset: model, batch and optimizer settings"
    )
    parser.add_argument("--data", required=True, help="shard folder")
    parser.add_argument("--output", required=True, help="folder for metrics.jsonl")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to run")
    parser.add_argument("--log-every", type=int, default=10, help="steps per measured window")
    parser.add_argument(
        "--local-batch-size", type=int, help="images per rank per step (default: the preset's plan)"
    )
    parser.add_argument(
        "--workers", type=int, help="DataLoader workers per rank (default: usable cores / ranks)"
    )
    args = parser.parse_args(argv)
    os.environ["MAE_KERNELS"] = "torch"  # the reference formulation of masking and loss

    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")
    )
    if gpu:
        torch.cuda.set_device(device)
    cfg = load_config(args.config, [f"data.shards={args.data}"])
    batch = (
        args.local_batch_size
        or cfg.optim.max_local_batch_size
        or cfg.optim.global_batch_size // world
    )
    torch.manual_seed(cfg.runtime.seed)
    model = mae_from_config(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim, peak_lr(cfg.optim, batch * world))
    ddp = DistributedDataParallel(model, device_ids=[device.index] if gpu else None)
    loader = build_loader(
        cfg.data.shards,
        local_batch_size=batch,
        img_size=cfg.data.img_size,
        rank=rank,
        world_size=world,
        seed=cfg.runtime.seed,
        backend="pil",
        num_threads=args.workers,
        device="gpu" if gpu else "cpu",
    )
    flops = mae_train_flops(model, cfg.model.mask_ratio)
    peak = peak_flops(torch.cuda.get_device_name()) if gpu else None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    step, epoch, window_start, waited = 0, 0, time.perf_counter(), loader.wait_s
    steps_per_epoch = len(loader)
    while step < args.steps:
        loader.set_epoch(epoch)
        for images, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step / steps_per_epoch, optimizer.defaults["lr"], cfg.optim)
            with (
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu),
                sdpa_kernel(SDPBackend.MATH),
            ):
                loss, _, _ = ddp(images, mask_ratio=cfg.model.mask_ratio)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.log_every == 0:
                loss.item()  # the window ends when its work is done
                elapsed = time.perf_counter() - window_start
                img_per_s = args.log_every * batch * world / elapsed
                record = {"step": step, "loss": loss.item(), "img_per_s": img_per_s,
                          "data_stall_pct": 100 * (loader.wait_s - waited) / elapsed,
                          "mfu": flops * img_per_s / peak / world if peak else None}
                if rank == 0:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                window_start, waited = time.perf_counter(), loader.wait_s
            if step >= args.steps:
                break
        epoch += 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
