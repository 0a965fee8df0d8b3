"""Triton kernels against their torch references (CPU interpreter here, bf16 on a GPU)."""

import pytest
import torch

from kernels import (
    decoder_tokens,
    decoder_tokens_reference,
    masked_patch_mse,
    masked_patch_mse_reference,
    visible_tokens,
    visible_tokens_reference,
)
from model import random_masking
from tests.helpers import small_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """torch.empty returns NaN-filled memory, so any output element a kernel forgets fails."""
    monkeypatch.setenv("MAE_KERNELS", "triton")
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = previous


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "output has NaN/inf (unwritten element?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_both(op, reference, inputs: list[torch.Tensor], extra: tuple):
    """Forward and backward of op and reference on cloned leaves; returns (outs, grads) pairs.

    Both get the same output gradient (drawn in float32, then cast to the output's dtype)."""
    results = []
    for fn in (op, reference):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves, *extra)
        torch.manual_seed(1)
        out.backward(torch.randn(out.shape, device=out.device).to(out.dtype) if out.dim() else None)
        results.append((out.detach(), [leaf.grad for leaf in leaves if leaf.is_floating_point()]))
    return results


def masking(n: int, length: int, keep: int):
    noise = torch.rand(n, length, device=DEVICE)
    return random_masking(noise, 1 - (keep + 0.5) / length)


TOKEN_SHAPES = [(2, 16, 4, 32), (3, 15, 5, 48), (1, 7, 1, 1), (2, 196, 49, 40), (1, 12, 11, 600)]


@pytest.mark.parametrize("n, length, keep, width", TOKEN_SHAPES)
def test_visible_tokens_match_reference(n, length, keep, width):
    ids_keep, ids_restore, _ = masking(n, length, keep)
    assert ids_keep.shape[1] == keep
    x = torch.randn(n, length, width, device=DEVICE)
    pos, cls = (
        torch.randn(1, length + 1, width, device=DEVICE),
        torch.randn(1, 1, width, device=DEVICE),
    )
    (out, grads), (ref_out, ref_grads) = run_both(
        visible_tokens, visible_tokens_reference, [x, pos, cls], (ids_keep, ids_restore)
    )
    assert out.shape == (n, keep + 1, width)
    assert rel_err(out, ref_out) <= 1e-6
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("n, length, keep, width", TOKEN_SHAPES)
def test_decoder_tokens_match_reference(n, length, keep, width):
    _, ids_restore, _ = masking(n, length, keep)
    x = torch.randn(n, keep + 1, width, device=DEVICE)
    token, pos = (
        torch.randn(1, 1, width, device=DEVICE),
        torch.randn(1, length + 1, width, device=DEVICE),
    )
    (out, grads), (ref_out, ref_grads) = run_both(
        decoder_tokens, decoder_tokens_reference, [x, token, pos], (ids_restore,)
    )
    assert out.shape == (n, length + 1, width)
    assert rel_err(out, ref_out) <= 1e-6
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(grad, ref_grad) <= 1e-5


LOSS_CASES = [
    (2, 3, 32, 32, 8),   # square grid
    (1, 3, 28, 42, 14),  # patch 14, non-square 2x3 grid, P = 588 (not a power of two)
    (3, 1, 6, 4, 2),     # one channel, tiny patches
    (2, 3, 48, 16, 16),  # P = 768 as in ViT-B/16
]


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("n, chans, height, width, patch", LOSS_CASES)
def test_masked_mse_matches_reference(n, chans, height, width, patch, norm_pix):
    length = (height // patch) * (width // patch)
    imgs = torch.randn(n, chans, height, width, device=DEVICE)
    # pred as the decoder produces it: a view that drops the cls row, so not contiguous.
    pred = torch.randn(n, length + 1, patch * patch * chans, device=DEVICE)[:, 1:]
    mask = (torch.rand(n, length, device=DEVICE) < 0.7).float()
    mask[0, 0] = 1.0
    (loss, grads), (ref_loss, ref_grads) = run_both(
        masked_patch_mse, masked_patch_mse_reference, [pred, imgs], (mask, patch, norm_pix)
    )
    assert rel_err(loss, ref_loss) <= 1e-5
    assert grads[1] is None  # images are data: the fused loss does not differentiate them
    assert rel_err(grads[0], ref_grads[0]) <= 1e-5
    # Gradient is exactly zero on the patches the loss ignores.
    assert torch.all(grads[0][mask == 0] == 0)


def test_masked_mse_on_flat_patches_matches_the_reference():
    """A constant patch (sky, a black border) has zero variance: the norm-pix epsilon keeps target
    and gradient finite, and the kernel must use the same epsilon as the reference."""
    imgs = torch.randn(2, 3, 16, 16, device=DEVICE)
    imgs[0, :, :8, :8] = 0.25  # patch 0 of image 0 flat
    imgs[1] = -1.0  # every patch of image 1 flat
    pred = torch.randn(2, 4, 192, device=DEVICE) * 1e-3
    mask = torch.ones(2, 4, device=DEVICE)
    (loss, grads), (ref_loss, ref_grads) = run_both(
        masked_patch_mse, masked_patch_mse_reference, [pred, imgs], (mask, 8, True)
    )
    assert torch.isfinite(loss) and torch.isfinite(grads[0]).all()
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(grads[0], ref_grads[0]) <= 1e-5
    # A flat patch's normalized target is 0 (not NaN, not a huge value): its loss is the
    # prediction's own square.
    flat = masked_patch_mse(pred[1:], imgs[1:], mask[1:], 8, True)
    assert flat.item() == pytest.approx(pred[1].pow(2).mean().item(), rel=1e-4)


def test_masked_mse_skips_unmasked_patches_and_weights_masked_ones():
    imgs = torch.randn(1, 3, 16, 16, device=DEVICE)
    pred = torch.randn(1, 4, 192, device=DEVICE)
    weights = torch.tensor([[0.0, 2.0, 0.5, 0.0]], device=DEVICE)
    loss = masked_patch_mse(pred, imgs, weights, 8, True)
    assert rel_err(loss, masked_patch_mse_reference(pred, imgs, weights, 8, True)) <= 1e-6
    pred_changed = pred.clone()
    pred_changed[0, 0] += 100.0  # an unmasked patch: no effect
    assert masked_patch_mse(pred_changed, imgs, weights, 8, True).item() == loss.item()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_whole_model_triton_matches_torch(norm_pix_loss, monkeypatch):
    imgs, noise = torch.randn(2, 3, 32, 32, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    results = {}
    monkeypatch.delenv("MAE_KERNELS")  # the model's own choice, as the config sets it
    for backend in ("torch", "triton"):
        model = small_model(norm_pix_loss=norm_pix_loss).to(DEVICE)
        model.kernels = backend
        loss, pred, mask = model(imgs, noise=noise)
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        results[backend] = (loss.detach(), pred.detach(), mask, grads)
    loss, pred, mask, grads = results["triton"]
    ref_loss, ref_pred, ref_mask, ref_grads = results["torch"]
    assert torch.equal(mask, ref_mask)
    assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(pred, ref_pred) <= 1e-5
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


def test_dispatch_rules(monkeypatch):
    x64 = torch.randn(1, 4, 8, dtype=torch.float64)
    ids_keep, ids_restore, _ = masking(1, 4, 2)
    args = (
        x64,
        torch.zeros(1, 5, 8, dtype=torch.float64),
        torch.zeros(1, 1, 8, dtype=torch.float64),
        ids_keep.cpu(),
        ids_restore.cpu(),
    )
    monkeypatch.delenv("MAE_KERNELS")
    with pytest.raises(
        RuntimeError, match="kernels set to triton but visible_tokens cannot run in Triton"
    ):
        visible_tokens(*args, choice="triton")
    # float64: the reference
    assert torch.equal(visible_tokens(*args, choice="auto"), visible_tokens_reference(*args))
    # the environment overrides the model's choice (tests, benchmarks)
    monkeypatch.setenv("MAE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="kernels set to triton"):
        visible_tokens(*args, choice="torch")
    monkeypatch.setenv("MAE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MAE_KERNELS must be auto, torch or triton"):
        visible_tokens(*args)


def flash_rule_errors(op, reference, inputs: list[torch.Tensor], extra: tuple,
                      dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, float, float]]:
    """(what, kernel error in `dtype`, torch error in `dtype`) for the output and every input
    gradient, both measured against torch in float32 on the same inputs and output gradient."""
    exact = run_both(reference, reference, inputs, extra)[0]
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    (ours, ours_grads), (theirs, theirs_grads) = run_both(op, reference, low, extra)
    rows = [("output", rel_err(ours, exact[0]), rel_err(theirs, exact[0]))]
    for i, (grad, ref_grad, exact_grad) in enumerate(
        zip(ours_grads, theirs_grads, exact[1], strict=True)
    ):
        if grad is not None:  # the loss takes no gradient for its images: they are data
            rows.append(
                (f"grad of input {i}", rel_err(grad, exact_grad), rel_err(ref_grad, exact_grad))
            )
    return rows


def flash_rule_cases(op: str, n: int, length: int, keep: int, width: int, patch: int) -> tuple:
    """(op, reference, fp32 inputs, the arguments after them) for one kernel at one shape."""
    ids_keep, ids_restore, mask = masking(n, length, keep)
    if op == "visible_tokens":
        return (
            visible_tokens,
            visible_tokens_reference,
            [
                torch.randn(n, length, width, device=DEVICE),
                torch.randn(1, length + 1, width, device=DEVICE),
                torch.randn(1, 1, width, device=DEVICE),
            ],
            (ids_keep, ids_restore),
        )
    if op == "decoder_tokens":
        return (
            decoder_tokens,
            decoder_tokens_reference,
            [
                torch.randn(n, keep + 1, width, device=DEVICE),
                torch.randn(1, 1, width, device=DEVICE),
                torch.randn(1, length + 1, width, device=DEVICE),
            ],
            (ids_restore,),
        )
    side = int(length**0.5) * patch
    return (
        masked_patch_mse,
        masked_patch_mse_reference,
        [
            torch.randn(n, length, patch * patch * 3, device=DEVICE),
            torch.randn(n, 3, side, side, device=DEVICE),
        ],
        (mask, patch, True),
    )


def assert_flash_rule(op: str, shape: tuple, dtype: torch.dtype) -> None:
    kernel, reference, inputs, extra = flash_rule_cases(op, *shape)
    rows = flash_rule_errors(kernel, reference, inputs, extra, dtype)
    assert len(rows) >= 2  # the output and at least one gradient
    for what, ours, torch_err in rows:
        assert ours <= 2 * torch_err + 1e-6, (
            f"{op} {shape} {what}: kernel {ours:.3g} vs torch {torch_err:.3g}"
        )


KERNEL_OPS = ["visible_tokens", "decoder_tokens", "masked_patch_mse"]
# The trainer's shapes (N, L, K, width, patch): ViT-B/16 at local batch 256 and ViT-H/14 at 128; the
# token ops' width is the encoder's for visible_tokens and the decoder's 512 for decoder_tokens.
REAL_SHAPES = {"vit_b16": (256, 196, 49, 768, 16), "vit_h14": (128, 256, 64, 1280, 14)}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", sorted(REAL_SHAPES))
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_bf16_kernels_within_twice_torch_error_at_real_shapes(op, shape):
    """flash-attention's rule: the kernel's bf16 error is at most twice torch's, both against
    fp32."""
    n, length, keep, width, patch = REAL_SHAPES[shape]
    assert_flash_rule(
        op, (n, length, keep, 512 if op == "decoder_tokens" else width, patch), torch.bfloat16
    )


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_fp16_kernels_within_twice_torch_error(op):
    """The same rule in float16 at a small shape, which the CPU interpreter can run (numpy has no
    bf16)."""
    assert_flash_rule(op, (3, 16, 4, 48, 4), torch.float16)


def test_kernels_compile_for_h100_with_the_real_compiler(tmp_path):
    """The interpreter accepts code the GPU compiler rejects (types across branches, casts): compile
    for sm_90."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    script = Path(__file__).parent / "scripts" / "compile_for_h100.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled for sm_90") == 16
