"""The FLOP count behind every MFU figure, and the reconstruction figure a person reads."""

import numpy as np
import pytest
import torch

from model import build_mae
from model.flops import block_flops, mae_forward_flops, mae_train_flops, peak_flops
from pipeline import IMAGENET_MEAN
from tests.helpers import small_model
from train.viz import MIN_CELL, TITLE_BAND, reconstruction_grid


@pytest.mark.parametrize(
    "name, gmacs",
    [
        ("mae_vit_base_patch16", 9.8),
        ("mae_vit_large_patch16", 20.8),
        ("mae_vit_huge_patch14", 48.6),
    ],
)
def test_forward_flops_match_the_published_counts(name, gmacs):
    """MAE forward at 224 with 75% masking, matmuls only: ViT-B 9.8, ViT-L 20.8, ViT-H/14 48.6 GMACs
    per image."""
    with torch.device("meta"):  # the count needs the shapes, not 630M initialised weights
        model = build_mae(name)
    assert mae_forward_flops(model) / 2e9 == pytest.approx(gmacs, rel=0.01)
    assert mae_train_flops(model) == 3 * mae_forward_flops(model)


def test_a_block_costs_24_d_squared_plus_4_n_d_per_token():
    assert block_flops(tokens=65, width=1280) == 65 * (24 * 1280**2 + 4 * 65 * 1280)
    # ViT-H/14's encoder on its 1 + 64 visible tokens: 41.2 GMACs of the 48.6.
    assert 32 * block_flops(65, 1280) / 2e9 == pytest.approx(41.2, rel=0.01)


def test_peak_flops_are_known_for_datacenter_gpus_only():
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None and peak_flops("NVIDIA GeForce GTX 1080") is None
    # The PCIe and NVL H100s are not the SXM one; a B200 is not an H100.
    assert (
        peak_flops("NVIDIA H100 PCIe"),
        peak_flops("NVIDIA H100 NVL"),
        peak_flops("NVIDIA B200"),
    ) == (756e12, 835e12, 2250e12)


def test_the_reconstruction_grid_shows_original_masked_reconstruction_and_paste():
    """Four columns per image: the original, the visible patches (removed ones the mean colour, the
    normalized zero), the prediction, and the prediction pasted into the removed patches; enlarged
    so that patches stay visible."""
    model = small_model()  # 32 x 32 images, 8 x 8 patches: 16 patches
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1.5, 1.5)
    pred = model.patchify(torch.full((2, 3, 32, 32), 1.0))  # predicts one flat colour everywhere
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1  # the top row of patches removed
    picture = reconstruction_grid(model, images, pred, mask)
    scale = MIN_CELL // 32
    assert picture.size == (4 * 32 * scale, TITLE_BAND + 2 * 32 * scale)
    titles, pixels = np.split(np.asarray(picture).astype(int), [TITLE_BAND])
    cell = 32 * scale
    for column in range(4):  # each column has its title written above it
        assert (titles[:, column * cell:(column + 1) * cell] < 128).any(), column
    original, masked, pasted = (pixels[:cell, c * cell:(c + 1) * cell] for c in (0, 1, 3))
    mean_colour = np.round(255 * np.array(IMAGENET_MEAN)).astype(int)
    # the removed row is blanked in the masked view
    assert (np.abs(masked[: 8 * scale] - mean_colour) <= 1).all()
    assert (masked[8 * scale:] == original[8 * scale:]).all()
    assert (pasted[8 * scale:] == original[8 * scale:]).all()  # visible patches are the original's
    # removed patches show the prediction
    assert not (pasted[: 8 * scale] == original[: 8 * scale]).all()
