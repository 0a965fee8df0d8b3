"""Model step time, as images/s and MFU: MAE's encoder on visible tokens vs with mask tokens (the
paper's Table 2); maeflow's forward+backward (fused kernels, SDPA) vs the reference formulation
(repeat-gather, unfused loss, eager math attention); and, on a GPU, the fused kernels against their
torch references inside a full step with the same attention, with the kernels' share of the step's
device time. On a CPU, each GPU preset's traffic budget (`bench.traffic`) and the H200 step it
projects to."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.context import BenchContext
from bench.harness import Record, Stat, kernels_backend, rate, time_repeats
from bench.traffic import MATMUL_TFLOPS, MEMORY_TB_S, mae_budget
from model import MaskedAutoencoderViT, build_mae
from model.flops import PEAK_BF16_FLOPS, mae_train_flops, peak_flops
from train.config import load_config

# the presets whose H200 step a CPU projects
PROJECTED = ("vit_b16_1600ep", "vit_l16_1600ep", "vit_h14_1600ep")


def encoder_step(
    model: MaskedAutoencoderViT, imgs: torch.Tensor, with_mask_tokens: bool
) -> Callable[[], None]:
    """Forward+backward of the model's encoder on 1+K visible tokens, or on all 1+L tokens: the cost
    of the paper's variant that feeds mask tokens to the encoder (mask_ratio 0 keeps every
    patch)."""
    mask_ratio = 0.0 if with_mask_tokens else 0.75

    def step() -> None:
        latent, _, _ = model.forward_encoder(imgs, mask_ratio)
        latent.float().pow(2).mean().backward()
    return step


def mae_step(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss, _, _ = model(imgs, 0.75)
        loss.backward()
    return step


OUR_KERNELS = ("_visible_tokens_", "_decoder_tokens_", "_masked_mse_")


def kernel_share(step: Callable[[], None]) -> float:
    """Fraction of one step's GPU time spent in the fused masking and loss kernels."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    times = {e.key: getattr(e, "self_device_time_total", 0) for e in prof.key_averages()}
    return sum(t for key, t in times.items() if any(k in key for k in OUR_KERNELS)) / max(
        1, sum(times.values())
    )


def run(ctx: BenchContext) -> Iterator[Record]:
    gpu = ctx.device == "gpu"
    setups = [("mae_vit_base_patch16", 224, 128), ("mae_vit_huge_patch14", 224, 32)] if gpu else \
        [("mae_vit_tiny_patch16", 64, 16)]
    repeats = (10 if ctx.quick else 30) if gpu else 3
    device = ctx.torch_device
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=gpu)
    peak = peak_flops(torch.cuda.get_device_name()) if gpu else None
    for name, size, batch in setups:
        model = build_mae(name, img_size=size, norm_pix_loss=True).to(device)
        imgs = torch.randn(batch, 3, size, size, device=device)
        config = {
            "model": name,
            "img_size": size,
            "batch": batch,
            "precision": "bf16 autocast" if gpu else "fp32",
        }
        timing = "cuda" if gpu else "cpu"
        # On a CPU without the interpreter, "auto" already means the torch references.
        with autocast, kernels_backend("auto" if gpu else "torch"):
            visible = time_repeats(
                encoder_step(model, imgs, False), repeats, warmup=2, device=timing
            )
            full = time_repeats(encoder_step(model, imgs, True), repeats, warmup=2, device=timing)
            ours = time_repeats(mae_step(model, imgs), repeats, warmup=2, device=timing)
        with autocast, kernels_backend("torch"), sdpa_kernel(SDPBackend.MATH):
            reference = time_repeats(mae_step(model, imgs), repeats, warmup=2, device=timing)
        flops = mae_train_flops(model)
        ours_rate = rate(batch, ours)
        yield Record(
            "model",
            f"encoder_visible_vs_mask_tokens.{name}",
            "img/s",
            rate(batch, visible),
            rate(batch, full),
            "encoder with mask tokens (all patches)",
            config,
        )
        yield Record("model", f"mae_step.{name}", "img/s", ours_rate, rate(batch, reference),
                     "reference formulation (repeat-gather, unfused loss, math attention)",
                     {**config, "kernels": "triton" if gpu else "torch"},
                     extra={"mfu": flops * ours_rate.median / peak if peak else None})
        if gpu:  # the kernels against their references in a whole step, attention the same
            with autocast, kernels_backend("torch"):
                torch_ops = time_repeats(mae_step(model, imgs), repeats, warmup=2, device=timing)
            with autocast, kernels_backend("triton"):
                share = kernel_share(mae_step(model, imgs))
            yield Record(
                "model",
                f"mae_step_kernels.{name}",
                "img/s",
                ours_rate,
                rate(batch, torch_ops),
                "the same step with the torch references of the three ops",
                {**config, "attention": "SDPA auto in both"},
                extra={"kernels_share_of_step_device_time": share},
            )
        del model
    # counted on the CPU; a GPU run measures instead, and the report sets the two side by side
    if not gpu:
        yield from projected_steps(["tiny"] if ctx.quick else list(PROJECTED))


def projected_steps(presets: list[str]) -> list[Record]:
    """Per preset, the H200 step its counted traffic projects to, at the preset's largest local
    batch."""
    records = []
    for preset in presets:
        cfg = load_config(preset)
        batch = cfg.optim.max_local_batch_size or cfg.optim.global_batch_size
        budget = mae_budget(cfg.model.name, cfg.data.img_size, batch)
        img_per_s = 1 / budget.projected_seconds_per_image
        records.append(
            Record(
                "model",
                f"projected_h200_step.{cfg.model.name}",
                "img/s",
                Stat(img_per_s, img_per_s, img_per_s, 1),
                config={
                    "model": cfg.model.name,
                    "img_size": cfg.data.img_size,
                    "local_batch_size": batch,
                    "precision": "bf16 autocast, eager",
                    "projection": f"H200: matmuls at {MATMUL_TFLOPS:.0f} "
                    f"TFLOP/s, every other op's bytes at {MEMORY_TB_S} TB/s, nothing overlapped",
                },
                extra={
                    "matmul_gflop_per_image": budget.matmul_flops_per_image / 1e9,
                    "other_gb_per_image": budget.other_bytes_per_image / 1e9,
                    "other_gb_per_step": budget.other_bytes_per_step / 1e9,
                    "memory_share": budget.memory_share,
                    "projected_mfu": budget.matmul_flops_per_image
                    * img_per_s
                    / PEAK_BF16_FLOPS["H200"],
                    "top_ops_gb_per_image": {op: moved / 1e9 for op, moved in budget.top_ops},
                },
            )
        )
    return records
