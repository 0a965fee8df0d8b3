"""Weights in the reference MAE layout: read them safely, load them into a model, name the decoder
part.

The files are those the reference code released or saved (`mae_pretrain_vit_*.pth`, its training
checkpoints) and those `train.export` writes: `{"model": state_dict, ...}` or a bare state dict.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass, field

import torch

from model.mae import MaskedAutoencoderViT


class WeightsError(ValueError):
    """A weight file that cannot be read safely, or that holds another model than the one it is
    loaded into."""


# state-dict keys of the decoder; the rest is the encoder
DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass
class LoadReport:
    """What loading a weight file found, in words a user can act on."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def encoder_only(self) -> bool:
        return bool(self.missing) and all(key.startswith(DECODER_PREFIXES) for key in self.missing)

    def __str__(self) -> str:
        if not self.missing and not self.unexpected:
            return "all weights loaded (encoder and decoder)"
        lines = []
        if self.encoder_only:
            lines.append(
                f"encoder-only checkpoint: the decoder ({len(self.missing)} tensors) keeps its "
                "fresh init"
            )
        elif self.missing:
            lines.append(
                f"{len(self.missing)} weights missing from the checkpoint: "
                f"{', '.join(self.missing[:8])}"
                + (" ..." if len(self.missing) > 8 else "")
            )
        if self.unexpected:
            lines.append(
                f"{len(self.unexpected)} checkpoint entries the model does not have (ignored): "
                + ", ".join(self.unexpected[:8])
                + (" ..." if len(self.unexpected) > 8 else "")
            )
        return "; ".join(lines)


# The only non-tensor, non-builtin type weight files in the wild hold: the reference training script
# saves its command-line arguments (`args`) beside the weights. Everything else a pickle could name
# (callables, arbitrary classes) is refused, because unpickling can run code on every rank.
SAFE_CHECKPOINT_TYPES = [argparse.Namespace]


def load_weights_file(path: str | os.PathLike) -> object:
    """`torch.load` restricted to tensors, containers and `SAFE_CHECKPOINT_TYPES`; a clear error
    otherwise."""
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_TYPES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a paragraph that ends advising to allow-list the object; name it
        # instead.
        named = re.search(r"GLOBAL (\S+)", str(err))
        culprit = f"it names {named.group(1)}" if named else "it holds an object torch refuses"
        raise WeightsError(
            f"{path}: refused to load: {culprit}; weight files may hold only tensors and plain "
            "data, since unpickling anything else can run code"
        ) from None


def read_weights(source: str | os.PathLike | dict) -> dict[str, torch.Tensor]:
    """The state dict in a file (or dict) holding `{"model": state_dict, ...}` or a bare state
    dict."""
    obj = source if isinstance(source, dict) else load_weights_file(source)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{source if not isinstance(source, dict) else 'weights'}: "
                         "expected {'model': state_dict} or a state dict of tensors")
    return state


def load_reference_weights(
    model: MaskedAutoencoderViT, source: str | os.PathLike | dict, strict: bool = False
) -> LoadReport:
    """Copy reference-layout weights into `model`.

    Encoder-only files (`mae_pretrain_vit_*.pth`) leave the decoder as initialised. Any shape
    mismatch is an error naming the tensor; with `strict`, so is any missing or unexpected key.
    """
    state = read_weights(source)
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {list(value.shape)} vs model {list(own[key].shape)}"
        for key, value in state.items()
        if key in own and own[key].shape != value.shape
    ]
    if mismatched:
        raise WeightsError(
            "weights do not fit this model (wrong preset or image size?): " + "; ".join(mismatched)
        )
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(missing=list(result.missing_keys), unexpected=list(result.unexpected_keys))
    if strict and (report.missing or report.unexpected):
        raise WeightsError(f"strict load failed: {report}")
    return report
