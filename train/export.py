"""Consolidate a run's newest checkpoint into one file in the reference MAE layout (a fine-tuning
run's: the reference fine-tuning code's classifier layout).

    python -m train.export OUTPUT --to mae_vit_h.pth [--encoder-only] [--tag step00001200]

The file holds {"model": state_dict, "maeflow": {...}} with the reference parameter names, so the
reference fine-tuning code (`checkpoint["model"]`) and timm's ViT load it. ZeRO shards are merged
with DeepSpeed's zero_to_fp32 machinery (stage 0 has none: its module weights are taken as saved);
weights are written in float32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from model.vit import build_classifier
from model.weights import DECODER_PREFIXES, load_weights_file
from pipeline.atomic import atomic_path
from pipeline.formats import stamp
from train.checkpoint import LATEST, sound_resume_tag
from train.config import ConfigError, config_from_json
from train.mae_task import mae_from_config


def consolidated_state_dict(
    output: Path, wanted: str = LATEST
) -> tuple[dict[str, torch.Tensor], dict]:
    """float32 reference-layout weights of a complete checkpoint (the newest by default), and
    provenance."""
    if not (output / "config.json").is_file():
        raise FileNotFoundError(f"{output} is not a training output folder (no config.json there)")
    cfg = config_from_json(output / "config.json")
    ckpt_dir = output / "checkpoints"
    tag, passed_over = sound_resume_tag(ckpt_dir, wanted)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint")
    for line in passed_over:
        print(f"{line}: exporting {tag}, the newest sound checkpoint before it")
    if list((ckpt_dir / tag).glob("*zero_pp_rank_*")):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO stage 0 in fp32: no optimizer shards, the module's own weights are the full ones
        weights = load_weights_file(ckpt_dir / tag / "mp_rank_00_model_states.pt")["module"]
    if cfg.TASK == "finetune":  # its classifier, the head as the checkpoint holds it
        head = weights.get("head.weight", weights.get("head.1.weight"))
        model = build_classifier(cfg.model.name, cfg.data.img_size, head.shape[0],
                                 probe=cfg.finetune.mode == "linear_probe")
    elif cfg.TASK == "pretrain":
        model = mae_from_config(cfg)
    else:
        raise ConfigError(
            f"{output} is a run of task {cfg.TASK!r}: export writes pre-training and fine-tuning "
            "runs"
        )
    # The sin-cos position embeddings are frozen and fixed by the config: rebuild any DeepSpeed
    # omitted.
    fixed = {k: v for k, v in model.state_dict().items() if k not in weights and "pos_embed" in k}
    model.load_state_dict({**weights, **fixed}, strict=True)
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    return state, stamp("weights", {"config": cfg.to_dict(), "checkpoint": str(ckpt_dir / tag)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maeflow-export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "output", help="a training output folder (holds config.json and checkpoints/)"
    )
    parser.add_argument("--to", required=True, help="file to write")
    parser.add_argument(
        "--tag", default=LATEST, help="which checkpoint (e.g. step00001200; default: the newest)"
    )
    parser.add_argument(
        "--encoder-only",
        action="store_true",
        help="drop the decoder, as the released mae_pretrain_vit_*.pth files do",
    )
    args = parser.parse_args(argv)
    try:
        state, provenance = consolidated_state_dict(Path(args.output), args.tag)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # ResumeError is a RuntimeError
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)}
    target = Path(args.to)
    if not target.parent.is_dir():
        print(
            f"error: cannot write {target}: the folder {target.parent} does not exist",
            file=sys.stderr,
        )
        return 2
    try:
        with atomic_path(target) as tmp:
            torch.save({"model": state, "maeflow": provenance}, tmp)
    except OSError as err:
        print(f"error: cannot write {target}: {err.strerror or err}", file=sys.stderr)
        return 2
    params = sum(v.numel() for v in state.values())
    print(f"wrote {target}: {len(state)} tensors, {params / 1e6:.1f}M values"
          f"{' (encoder only)' if args.encoder_only else ''} from {provenance['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
