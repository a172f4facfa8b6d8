"""The LightningModule: next-token cross-entropy with teacher forcing, AdamW, warmup then cosine or WSD."""
from __future__ import annotations

import math
from typing import Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from pipeline.model.gpt import GPT, ModelConfig
from pipeline.train.spec import OptimSpec, Schedule

class LRSchedule:
    """Multiplier of the peak learning rate at a step.

    A class with plain attributes: LambdaLR saves its __dict__ in checkpoints, which Lightning loads with
    torch.load(weights_only=True).
    """

    def __init__(self, spec: OptimSpec, max_steps: int):
        self.schedule, self.warmup_steps, self.floor = Schedule(spec.schedule).value, spec.warmup_steps, spec.min_lr_ratio
        self.decay_fraction, self.max_steps = spec.decay_fraction, max_steps

    def __call__(self, step: int) -> float:
        floor = self.floor
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "wsd":
            decay_start = self.max_steps - round(self.decay_fraction * self.max_steps)
            if step < decay_start:
                return 1.0
            frac = (step - decay_start) / max(self.max_steps - decay_start, 1)
            return 1.0 - (1.0 - floor) * min(frac, 1.0)
        frac = min((step - self.warmup_steps) / max(self.max_steps - self.warmup_steps, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    """Decay matrices of the blocks; not norms, biases or (tied) embeddings."""
    embeddings = {id(model.tok_emb.weight)} | ({id(model.pos_emb.weight)} if model.pos_emb is not None else set())
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction=reduction)


class LanguageModel(pl.LightningModule):
    """Wraps GPT for training; ``model`` and ``optim`` are plain dicts so checkpoints carry them."""

    def __init__(self, model: dict, optim: dict, max_steps: int, compile: bool = False):
        super().__init__()
        self.model = GPT(ModelConfig(**model))
        self.optim_spec = OptimSpec(**optim)
        # Plain values (enums as strings), whatever the caller passed: every checkpoint then loads with
        # torch.load(weights_only=True), which refuses any other type (pipeline.model.gpt.read_checkpoint).
        self.save_hyperparameters({"model": self.model.cfg.as_dict(), "optim": self.optim_spec.as_dict(),
                                   "max_steps": max_steps, "compile": compile})
        self.max_steps = max_steps
        # Not a submodule attribute: the weights stay under "model." in the state dict, compiled or not.
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)
        self.grad_norm: Optional[float] = None
        self.val_sums: dict[int, list[float]] = {}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._forward(idx)[0]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = token_loss(self(batch[:, :-1]), batch[:, 1:])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning clips after this hook, so this is the norm before clipping.
        norms = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        self.grad_norm = float(torch.stack(norms).norm()) if norms else 0.0

    def on_validation_epoch_start(self) -> None:
        self.val_sums = {}

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = token_loss(self(batch[:, :-1]), batch[:, 1:], reduction="sum")
        sums = self.val_sums.setdefault(dataloader_idx, [0.0, 0])
        sums[0] += float(loss)
        sums[1] += batch[:, 1:].numel()

    def val_losses(self) -> dict[int, float]:
        """Mean nats per token for each validation loader of the last validation pass."""
        return {i: total / count for i, (total, count) in self.val_sums.items() if count}

    def configure_optimizers(self):
        s = self.optim_spec
        optimizer = torch.optim.AdamW(param_groups(self.model, s.weight_decay), lr=s.lr, betas=tuple(s.betas),
                                      eps=s.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(s, self.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def model_config(self) -> dict:
        return self.model.cfg.as_dict()
