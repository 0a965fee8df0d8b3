import pytest
import torch

from model import (
    MaskedAutoencoderViT,
    load_reference_weights,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    patchify,
    unpatchify,
)
from tests.helpers import SMALL, small_model
from tests.independent_mae import mae_forward


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_matches_independent_mae_in_float64(norm_pix_loss, monkeypatch):
    monkeypatch.setenv("MAE_KERNELS", "torch")
    model = small_model(norm_pix_loss=norm_pix_loss).double()
    imgs = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(3, 16, dtype=torch.float64)

    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()

    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    cfg = dict(SMALL, norm_pix_loss=norm_pix_loss)
    ref_loss, ref_pred, ref_mask = mae_forward(params, imgs, noise, cfg)
    ref_loss.backward()

    torch.testing.assert_close(mask, ref_mask, rtol=0, atol=0)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(
                param.grad, params[name].grad, rtol=1e-8, atol=1e-10, msg=name
            )


def test_kept_tokens_are_the_lowest_noise_ones():
    model = small_model()
    noise = torch.rand(4, 16)
    _, mask, ids_restore = model.forward_encoder(torch.randn(4, 3, 32, 32), 0.75, noise)
    for n in range(4):
        lowest = set(torch.topk(noise[n], 4, largest=False).indices.tolist())
        assert set(torch.nonzero(mask[n] == 0).flatten().tolist()) == lowest
        assert sorted(ids_restore[n].tolist()) == list(range(16))
    assert mask.sum().item() == 4 * 12


def test_mask_is_a_function_of_noise():
    model = small_model()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    _, _, mask_a = model(imgs, noise=noise)
    _, _, mask_b = model(imgs, noise=noise.clone())
    _, _, mask_c = model(imgs, noise=torch.rand(2, 16))
    assert torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, mask_c)


def test_patchify_order_and_roundtrip():
    imgs = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(imgs, 2)
    assert patches.shape == (2, 6, 12)
    # First value of patch (row 0, col 1) is pixel (0, 2), then channels vary fastest.
    assert patches[0, 1, :3].tolist() == [imgs[0, c, 0, 2].item() for c in range(3)]
    assert torch.equal(unpatchify(patches, 2, grid=(2, 3)), imgs)


EXPECTED_BLOCK_KEYS = [
    f"{part}.{kind}" for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
]


@pytest.mark.parametrize(
    "builder, patch, dim, depth, encoder_params",
    [
        (mae_vit_base_patch16, 16, 768, 12, 86e6),
        (mae_vit_large_patch16, 16, 1024, 24, 304e6),
        (mae_vit_huge_patch14, 14, 1280, 32, 632e6),
    ],
)
def test_paper_presets_have_reference_layout(builder, patch, dim, depth, encoder_params):
    with torch.device("meta"):
        model = builder()
    state = model.state_dict()
    length = (224 // patch) ** 2
    expected = {
        "cls_token": (1, 1, dim), "pos_embed": (1, length + 1, dim), "mask_token": (1, 1, 512),
        "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,), "norm.bias": (dim,), "decoder_embed.weight": (512, dim),
        "decoder_embed.bias": (512,), "decoder_pos_embed": (1, length + 1, 512),
        "decoder_norm.weight": (512,), "decoder_norm.bias": (512,),
        "decoder_pred.weight": (patch * patch * 3, 512), "decoder_pred.bias": (patch * patch * 3,),
    }
    expected.update({f"blocks.{i}.{k}": None for i in range(depth) for k in EXPECTED_BLOCK_KEYS})
    expected.update(
        {f"decoder_blocks.{i}.{k}": None for i in range(8) for k in EXPECTED_BLOCK_KEYS}
    )
    assert set(state) == set(expected)
    for key, shape in expected.items():
        if shape is not None:
            assert tuple(state[key].shape) == shape, key
    assert tuple(state["blocks.0.attn.qkv.weight"].shape) == (3 * dim, dim)
    assert tuple(state["blocks.0.mlp.fc1.weight"].shape) == (4 * dim, dim)
    assert tuple(state["decoder_blocks.0.attn.qkv.weight"].shape) == (3 * 512, 512)
    encoder = sum(
        v.numel()
        for k, v in model.named_parameters()
        if not k.startswith(("decoder", "mask_token")) and v.requires_grad
    )
    assert abs(encoder - encoder_params) / encoder_params < 0.01
    assert model.blocks[0].norm1.eps == 1e-6


def test_bad_inputs_raise_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match=r"expected images of shape \[N, 3, 32, 32\]"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected images of shape"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=-0.1)
    with pytest.raises(ValueError, match=r"noise of shape \[1, 16\]"):
        model(torch.randn(1, 3, 32, 32), noise=torch.rand(1, 15))
    with pytest.raises(ValueError, match="not divisible by patch size"):
        MaskedAutoencoderViT(**{**SMALL, "img_size": 30})


def test_non_square_images_and_bf16_autocast():
    model = small_model(img_size=(32, 48))
    imgs = torch.randn(2, 3, 32, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = model(imgs)
    loss.backward()
    assert pred.shape == (2, 24, 192) and mask.shape == (2, 24)
    assert torch.isfinite(loss) and model.cls_token.grad is not None
    assert model.unpatchify(pred.float()).shape == imgs.shape


def test_reference_checkpoints_load(tmp_path):
    trained = small_model()
    for p in trained.parameters():
        p.data.add_(torch.randn_like(p))
    full = tmp_path / "full.pth"
    torch.save({"model": trained.state_dict(), "epoch": 3}, full)
    fresh = small_model()
    report = load_reference_weights(fresh, full, strict=True)
    assert str(report) == "all weights loaded (encoder and decoder)"
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    encoder_only = {
        k: v for k, v in trained.state_dict().items() if not k.startswith(("decoder", "mask_token"))
    }
    encoder_only["fc_norm.weight"] = torch.ones(32)
    report = load_reference_weights(small_model(), encoder_only)
    assert report.encoder_only and report.unexpected == ["fc_norm.weight"]
    assert "encoder-only checkpoint" in str(report) and "fc_norm.weight" in str(report)
    with pytest.raises(ValueError, match="strict load failed"):
        load_reference_weights(small_model(), encoder_only, strict=True)
    with pytest.raises(
        ValueError, match=r"pos_embed: checkpoint \[1, 17, 32\] vs model \[1, 37, 32\]"
    ):
        load_reference_weights(small_model(img_size=(32, 72)), full)


def saved_for_backward_bytes(
    model: MaskedAutoencoderViT, imgs: torch.Tensor, noise: torch.Tensor
) -> int:
    """Bytes autograd keeps from the forward for the backward: the activation memory of a training
    step."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(tensor, torch.nn.Parameter):  # weights are stored anyway
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = model(imgs, noise=noise)
    loss.backward()
    return total


def test_activation_recompute_saves_memory_not_results():
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    results, saved = [], []
    for recompute in (False, True):
        model = small_model(depth=6)
        model.set_grad_checkpointing(recompute)
        saved.append(saved_for_backward_bytes(model, imgs, noise))
        results.append((model(imgs, noise=noise)[0].detach(),
                        [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    # Recomputing the 6 encoder blocks keeps only their inputs: under half of what the plain forward
    # keeps.
    assert saved[1] < 0.5 * saved[0], saved
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


class _RunsCode:
    """Unpickling this calls a function: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_weight_files_holding_code_are_refused(tmp_path, capsys):
    model = small_model()
    evil = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "payload": _RunsCode()}, evil)
    with pytest.raises(ValueError, match=r"evil.pth: refused to load: it names print;"):
        load_reference_weights(small_model(), evil)
    assert "this ran while loading" not in capsys.readouterr().out
    # What the reference training script saves beside the weights still loads.
    import argparse
    own = tmp_path / "checkpoint-799.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {"state": {}},
            "epoch": 799,
            "scaler": {"scale": 1.0},
            "args": argparse.Namespace(blr=1.5e-4, model="mae_vit_base_patch16"),
        },
        own,
    )
    assert (
        str(load_reference_weights(small_model(), own, strict=True))
        == "all weights loaded (encoder and decoder)"
    )
