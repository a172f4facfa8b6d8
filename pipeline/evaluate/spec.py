"""The evaluate stage's settings that feed its library functions, importable without torch (the config reads them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.errors import check

POOLINGS = ("mean", "last")
LORA_HEADS = ("frozen", "fresh")


@dataclass
class HeadSpec:
    """What the task-head evaluation (pipeline/evaluate/head.py) trains and scores."""

    enabled: bool = False  # conf/evaluate.yaml turns it on with the SST-2 paths
    train_path: Optional[str] = None  # SST-2 train.tsv (sentence<TAB>label, no header)
    dev_path: Optional[str] = None
    test_path: Optional[str] = None
    train_limit: Optional[int] = 2000  # training sentences drawn with `seed`; None: all of train.tsv
    eval_limit: Optional[int] = None  # the first rows of dev and test; None: all
    seed: int = 0  # the training subset, the heads' initialisation, the adapters' and the batches' order
    pooling: str = "mean"  # mean: over the sentence's tokens; last: the last token's hidden state
    batch_size: int = 32  # sentences per batch, for features and for both trainings
    epochs: int = 20  # frozen + head: passes over the training subset
    lr: float = 1e-3  # frozen + head: AdamW learning rate
    weight_decay: float = 0.0  # both heads (and the adapters)
    lora: bool = True  # also train the LoRA + head classifier
    lora_r: int = 8
    lora_alpha: float = 16  # adapter updates are scaled by lora_alpha / lora_r
    lora_steps: int = 60  # LoRA + head: optimizer steps of batch_size sentences
    lora_lr: float = 1e-3  # LoRA + head: AdamW learning rate of adapters and head
    lora_head: str = "frozen"  # the LoRA classifier's head starts as: frozen (the trained frozen head) | fresh

    def __post_init__(self):
        for key in ("train_path", "dev_path", "test_path"):
            check(not self.enabled or bool(getattr(self, key)), key, getattr(self, key), "set when enabled")
        check(self.pooling in POOLINGS, "pooling", self.pooling, f"one of {', '.join(POOLINGS)}")
        check(self.lora_head in LORA_HEADS, "lora_head", self.lora_head, f"one of {', '.join(LORA_HEADS)}")
        for key in ("batch_size", "epochs", "lora_r", "lora_steps"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "at least 1")
        for key in ("train_limit", "eval_limit"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, value, "at least 1, or null for all rows")
        for key in ("lr", "lora_lr"):
            check(getattr(self, key) > 0, key, getattr(self, key), "positive")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "at least 0")
