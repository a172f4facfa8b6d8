"""LoRA's settings as a plain dataclass, importable without torch or peft (the config reads it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from pipeline.errors import check, choice

ATTENTION = ["attn.qkv", "attn.proj"]
MLP = ["mlp.up", "mlp.down", "mlp.gate"]  # mlp.gate: llama blocks only


class Bias(StrEnum):
    """Which biases train beside the adapters."""

    none = "none"
    all = "all"
    lora_only = "lora_only"


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float = 16  # updates are scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training only; > 0 also keeps a dropped copy of it for backward
    targets: list[str] = field(default_factory=lambda: list(ATTENTION))  # module-name suffixes; add MLP for the MLP
    bias: Bias = Bias.none
    tokens: list[int] = field(default_factory=list)  # token ids whose embedding rows train too (tied output rows follow)

    def __post_init__(self):
        self.bias = choice(Bias, self.bias, "bias")
        check(self.rank >= 1, "rank", self.rank, "at least 1")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
