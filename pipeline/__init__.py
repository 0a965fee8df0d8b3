"""Data path: image tree -> WebDataset shards -> DALI (or PIL) decoding -> normalized batches."""

from pipeline.loader import build_loader
from pipeline.loader_base import IMAGENET_MEAN, IMAGENET_STD, Loader

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Loader", "build_loader"]
