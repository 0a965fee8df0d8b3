"""Data path: image tree -> WebDataset shards -> DALI (or PIL) decoding -> normalized batches."""
