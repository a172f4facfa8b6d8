"""Encoding's settings as a plain dataclass, importable without datasets (the config reads it)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import check


@dataclass
class EncodeSpec:
    """How documents become shards: the tokenize stage's settings, which cpt's domain corpus follows too."""

    num_proc: int = 2  # processes for encoding
    batch_size: int = 5000  # documents per encode batch
    max_shard_tokens: int = 2**27  # a new shard file starts past this many tokens

    def __post_init__(self):
        for key in ("num_proc", "batch_size", "max_shard_tokens"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "at least 1")
