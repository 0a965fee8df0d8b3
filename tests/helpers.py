"""What several test modules share: a small model, the tiny training preset's model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from model import MaskedAutoencoderViT
from pipeline.formats import stamp
from train.checkpoint import MARK, describe_part
from train.config import load_config
from train.mae_task import mae_from_config

REPO = Path(__file__).resolve().parent.parent

SMALL = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
    decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2, mlp_ratio=4.0,
)


def small_model(**overrides) -> MaskedAutoencoderViT:
    """A two-block MAE on 32x32 images (16 patches of 8x8), seeded so every call builds the same
    weights."""
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**{**SMALL, **overrides})


def tiny_preset_model() -> MaskedAutoencoderViT:
    """The model `configs/tiny.toml` trains (what the demo and the training tests run)."""
    return mae_from_config(load_config(REPO / "configs" / "tiny.toml"))


def start_job(cmd: list[str], **popen) -> subprocess.Popen:
    """A job (launcher or rank) in a session of its own, as a scheduler starts one, its output
    captured: conftest kills whatever of it a failed or timed-out test leaves running."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **popen}
    # Its ranks compute masking and loss with the torch references unless the env says otherwise:
    # under the Triton interpreter a tiny model's step takes seconds, not milliseconds. The kernels'
    # own tests check the kernels, and one training run trains with them.
    popen["env"] = {"MAE_KERNELS": "torch", **(popen.get("env") or os.environ)}
    return subprocess.Popen(cmd, text=True, start_new_session=True, **popen)


def mark_checkpoint(folder: Path, step: int, world_size: int = 1) -> None:
    """A checkpoint's completion mark over the files `folder` holds, as the trainer writes one, and
    `latest` pointing at it: for checkpoints a test makes by hand."""
    parts = {p.name: describe_part(p) for p in sorted(folder.iterdir()) if p.is_file()}
    state = {"step": step, "epoch": 0, "samples": 16 * step, "world_size": world_size, "jobs": {}}
    (folder / MARK).write_text(json.dumps(stamp("checkpoint", {**state, "parts": parts})))
    (folder.parent / "latest").write_text(folder.name)
