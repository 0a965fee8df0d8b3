"""Data path: image tree -> WebDataset shards -> DALI (or PIL) decoding -> normalized batches."""

from pipeline.loader import IMAGENET_MEAN, IMAGENET_STD, Loader, build_loader

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Loader", "build_loader"]
