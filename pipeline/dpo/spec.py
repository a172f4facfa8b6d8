"""The DPO loss's settings as a plain dataclass, importable without torch (the config reads it)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pipeline.errors import check, choice


class LossType(StrEnum):
    sigmoid = "sigmoid"  # DPO
    ipo = "ipo"


@dataclass
class DpoLoss:
    beta: float = 0.1  # strength of the pull towards the reference (DPO's beta; IPO's tau)
    loss: LossType = LossType.sigmoid
    label_smoothing: float = 0.0  # conservative DPO: the assumed share of flipped labels (sigmoid only)

    def __post_init__(self):
        self.loss = choice(LossType, self.loss, "loss")
        check(self.beta > 0, "beta", self.beta, "positive")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "in [0, 0.5)")
        check(self.loss == LossType.sigmoid or self.label_smoothing == 0, "label_smoothing", self.label_smoothing,
              "0 with loss ipo (label smoothing is conservative DPO's, for the sigmoid loss)")
