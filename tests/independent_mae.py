"""An MAE forward pass written from the paper's description with loops and explicit indexing.

It shares no code with `model/` so that agreement between the two means something: patches are
cut with slicing loops, the mask is chosen by sorting Python floats, attention and LayerNorm are
spelled out, and the position embedding is evaluated from its formula.
"""

from __future__ import annotations

import math

import torch


def sincos_row(dim: int, row: int, col: int) -> torch.Tensor:
    quarter = dim // 4
    omega = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    values = []
    for coord in (col, row):  # first half: column index, second half: row index
        values += [math.sin(coord * w) for w in omega] + [math.cos(coord * w) for w in omega]
    return torch.tensor(values, dtype=torch.float64)


def position_table(dim: int, rows: int, cols: int) -> torch.Tensor:
    table = [torch.zeros(dim, dtype=torch.float64)]
    for r in range(rows):
        for c in range(cols):
            table.append(sincos_row(dim, r, c))
    # Checkpoints store the table as float32 parameters, so a float64 model sees rounded values.
    return torch.stack(table).float().double()


def cut_patches(img: torch.Tensor, p: int) -> list[torch.Tensor]:
    """One image [C, H, W] -> list of patch vectors in (row p, col q, channel c) order."""
    chans, height, width = img.shape
    patches = []
    for top in range(0, height, p):
        for left in range(0, width, p):
            vec = [
                img[c, top + i, left + j] for i in range(p) for j in range(p) for c in range(chans)
            ]
            patches.append(torch.stack(vec))
    return patches


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * weight + bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def linear(x: torch.Tensor, params: dict, name: str) -> torch.Tensor:
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def block(x: torch.Tensor, params: dict, prefix: str, heads: int) -> torch.Tensor:
    _tokens, dim = x.shape
    head_dim = dim // heads
    h = layer_norm(x, params[f"{prefix}.norm1.weight"], params[f"{prefix}.norm1.bias"])
    qkv = linear(h, params, f"{prefix}.attn.qkv")
    outputs = []
    for head in range(heads):
        q = qkv[:, head * head_dim:(head + 1) * head_dim]
        k = qkv[:, dim + head * head_dim:dim + (head + 1) * head_dim]
        v = qkv[:, 2 * dim + head * head_dim:2 * dim + (head + 1) * head_dim]
        scores = q @ k.T / math.sqrt(head_dim)
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        weights = weights / weights.sum(-1, keepdim=True)
        outputs.append(weights @ v)
    x = x + linear(torch.cat(outputs, dim=1), params, f"{prefix}.attn.proj")
    h = layer_norm(x, params[f"{prefix}.norm2.weight"], params[f"{prefix}.norm2.bias"])
    return x + linear(gelu(linear(h, params, f"{prefix}.mlp.fc1")), params, f"{prefix}.mlp.fc2")


def mae_forward(
    params: dict, imgs: torch.Tensor, noise: torch.Tensor, cfg: dict, mask_ratio: float = 0.75
):
    """Returns (loss, pred [N, L, p*p*C], mask [N, L]) for one batch, sample by sample."""
    p, heads, dec_heads = cfg["patch_size"], cfg["num_heads"], cfg["decoder_num_heads"]
    rows, cols = imgs.shape[2] // p, imgs.shape[3] // p
    length = rows * cols
    keep = int(length * (1 - mask_ratio))
    enc_pos = position_table(params["cls_token"].shape[-1], rows, cols)
    dec_pos = position_table(params["mask_token"].shape[-1], rows, cols)
    conv_w = params["patch_embed.proj.weight"]
    preds, masks, losses = [], [], []
    for n in range(imgs.shape[0]):
        order = sorted(range(length), key=lambda i: float(noise[n, i]))
        kept = order[:keep]
        # Encoder: embed each visible patch (conv == dot product over its (c, i, j) pixels).
        tokens = [params["cls_token"][0, 0] + enc_pos[0]]
        for idx in kept:
            top, left = (idx // cols) * p, (idx % cols) * p
            pixels = imgs[n, :, top:top + p, left:left + p]
            emb = (conv_w * pixels.unsqueeze(0)).sum((1, 2, 3)) + params["patch_embed.proj.bias"]
            tokens.append(emb + enc_pos[1 + idx])
        x = torch.stack(tokens)
        for i in range(cfg["depth"]):
            x = block(x, params, f"blocks.{i}", heads)
        x = layer_norm(x, params["norm.weight"], params["norm.bias"])
        # Decoder: visible tokens back to their patch slots, the mask token everywhere else.
        y = linear(x, params, "decoder_embed")
        slots = [y[0]] + [params["mask_token"][0, 0]] * length
        for k, idx in enumerate(kept):
            slots[1 + idx] = y[1 + k]
        y = torch.stack(slots) + dec_pos
        for i in range(cfg["decoder_depth"]):
            y = block(y, params, f"decoder_blocks.{i}", dec_heads)
        y = layer_norm(y, params["decoder_norm.weight"], params["decoder_norm.bias"])
        pred = linear(y, params, "decoder_pred")[1:]
        mask = torch.ones(length, dtype=imgs.dtype)
        mask[kept] = 0
        # Loss on removed patches only, against per-patch normalized pixels if asked.
        per_patch = []
        for idx, target in enumerate(cut_patches(imgs[n], p)):
            if cfg["norm_pix_loss"]:
                mean = target.sum() / target.numel()
                var = ((target - mean) ** 2).sum() / (target.numel() - 1)
                target = (target - mean) / torch.sqrt(var + 1e-6)
            per_patch.append(((pred[idx] - target) ** 2).mean())
        losses.append((torch.stack(per_patch) * mask).sum())
        preds.append(pred)
        masks.append(mask)
    mask = torch.stack(masks)
    return torch.stack(losses).sum() / mask.sum(), torch.stack(preds), mask
