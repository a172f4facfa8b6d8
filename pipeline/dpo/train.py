"""Direct preference optimisation (Rafailov et al. 2023) with a LoRA adapter: the loss, the module, the run.

The policy is the SFT model with a fresh adapter (peft); the reference is the same network with the adapter
switched off, so no second copy of the weights is held. For a pair with prompt x, replies y_w (chosen) and
y_l (rejected), and log pi(y | x) summed over the reply's tokens:

    implicit reward   r(y) = beta * (log pi(y | x) - log pi_ref(y | x))
    delta             (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    sigmoid (DPO)     -(1 - eps) * log sigmoid(beta * delta) - eps * log sigmoid(-beta * delta)
    ipo               (delta' - 1 / (2 * beta))^2, delta' with each log-ratio divided by its reply's length

eps is the label smoothing of conservative DPO (the share of pairs assumed flipped; 0 is plain DPO). IPO
averages the log-ratios per token as TRL does (and as the IPO authors' results were computed).

Each micro-batch holds B pairs as 2B rows, the chosen conversations then the rejected ones, so one forward
pass scores both replies; a second, without gradients and with the adapter off, scores them under the
reference. Validation reports, per held-out source: the loss, the reward accuracy (the chosen reply gets the
higher implicit reward), the reward margin, the mean log-probabilities of the chosen and rejected replies,
the ranking accuracy (the chosen reply is the more likely one: comparable between the SFT and the DPO
model), and the KL from the reference, per reply token, over the vocabulary at each chosen-reply position.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from pipeline.dpo.pairs import EncodedPair, PreferenceData
from pipeline.dpo.spec import DpoLoss, LossType
from pipeline.sft.batching import pad_batch
from pipeline.sft.chat import IGNORE
from pipeline.sft.lora import LoraSpec, add_lora, trainable_fraction
from pipeline.sft.train import SFTBatches, SFTModule
from pipeline.train.data import FromStep
from pipeline.train.module import OptimSpec
from pipeline.train.run import TrainerSpec, TrainOutcome, TrainSpec, fit


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's scored tokens, their count), logits at t scoring the label at t + 1."""
    targets = labels[:, 1:]
    scored = targets != IGNORE
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1), scored.sum(-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor,
             spec: DpoLoss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (loss, chosen reward, rejected reward). ``policy``, ``reference``, ``lengths`` are per row,
    the B chosen rows then the B rejected ones."""
    chosen_ratio, rejected_ratio = (policy - reference).chunk(2)
    if spec.loss == LossType.ipo:
        chosen_length, rejected_length = lengths.chunk(2)
        delta = chosen_ratio / chosen_length.clamp(min=1) - rejected_ratio / rejected_length.clamp(min=1)
        losses = (delta - 1 / (2 * spec.beta)) ** 2
    else:
        delta = chosen_ratio - rejected_ratio
        eps = spec.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(spec.beta * delta) - eps * F.logsigmoid(-spec.beta * delta)
    return losses, spec.beta * chosen_ratio.detach(), spec.beta * rejected_ratio.detach()


def kl_per_token(policy_logits: torch.Tensor, reference_logits: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of KL(pi || pi_ref) over the vocabulary at every scored position."""
    scored = labels[:, 1:] != IGNORE
    p = torch.log_softmax(policy_logits[:, :-1].float(), dim=-1)
    q = torch.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1)
    return (kl * scored).sum(), scored.sum()


VAL_KEYS = ("loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "ranking_accuracy")


class DPOModule(SFTModule):
    """``model`` is a peft model (the policy; ``disable_adapter()`` gives the reference); batches from ``PairBatches``."""

    def __init__(self, model: nn.Module, optim: OptimSpec, max_steps: int, spec: DpoLoss):
        super().__init__(model, optim, max_steps, adapters_only=True)
        self.spec = spec
        self.train_sums: dict[str, float] = {}
        self.val_stats: dict[int, dict[str, float]] = {}

    def scores(self, batch: dict[str, torch.Tensor], with_logits: bool = False):
        """Policy and reference log-probabilities of each row (and the logits with ``with_logits``)."""
        logits = self(batch)
        policy, lengths = sequence_logps(logits, batch["labels"])
        with torch.no_grad(), self.model.disable_adapter():
            reference_logits = self(batch)
            reference, _ = sequence_logps(reference_logits, batch["labels"])
        if with_logits:
            return policy, reference, lengths, logits, reference_logits
        return policy, reference, lengths

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        policy, reference, lengths = self.scores(batch)
        losses, chosen, rejected = dpo_loss(policy, reference, lengths, self.spec)
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        accumulate = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
        if batch_idx % accumulate == 0:
            self.train_sums = {}  # the first micro-batch of a step: measure the step train/loss is logged for
        sums = self.train_sums
        for key, value in (("reward_accuracy", (chosen > rejected).float().sum()),
                           ("reward_margin", (chosen - rejected).sum()), ("chosen_reward", chosen.sum()),
                           ("rejected_reward", rejected.sum()), ("pairs", len(chosen))):
            sums[key] = sums.get(key, 0.0) + float(value)
        return loss

    def pop_train_metrics(self) -> dict[str, float]:
        """Means over the pairs of the last optimizer step (TrainMetrics logs them beside its train/loss)."""
        sums, self.train_sums = self.train_sums, {}
        n = sums.pop("pairs", 0)
        return {f"train/{key}": value / n for key, value in sums.items()} if n else {}

    def on_validation_epoch_start(self) -> None:
        self.val_stats = {}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        policy, reference, lengths, logits, reference_logits = self.scores(batch, with_logits=True)
        losses, chosen, rejected = dpo_loss(policy, reference, lengths, self.spec)
        chosen_logp, rejected_logp = policy.chunk(2)
        half = len(chosen)
        kl, kl_tokens = kl_per_token(logits[:half], reference_logits[:half], batch["labels"][:half])
        stats = self.val_stats.setdefault(dataloader_idx, {})
        for key, value in (("loss", losses.sum()), ("reward_accuracy", (chosen > rejected).float().sum()),
                           ("reward_margin", (chosen - rejected).sum()), ("chosen_logp", chosen_logp.sum()),
                           ("rejected_logp", rejected_logp.sum()),
                           ("ranking_accuracy", (chosen_logp > rejected_logp).float().sum()),
                           ("pairs", half), ("kl", kl), ("kl_tokens", kl_tokens)):
            stats[key] = stats.get(key, 0.0) + float(value)

    def val_metrics(self, names: list[str], prefix: str = "val") -> dict[str, float]:
        """The validation's means per held-out source (``<prefix>_<source>/...``) and over all (``<prefix>/...``)."""
        total: dict[str, float] = {}
        out = {}
        for index, stats in sorted(self.val_stats.items()):
            for key, value in stats.items():
                total[key] = total.get(key, 0.0) + value
            out.update(_means(stats, f"{prefix}_{names[index + 1]}"))
        return {**_means(total, prefix), **out} if total else {}

    def val_losses(self) -> dict[int, float]:
        return {i: s["loss"] / s["pairs"] for i, s in self.val_stats.items() if s.get("pairs")}


def _means(stats: dict[str, float], prefix: str) -> dict[str, float]:
    out = {f"{prefix}/{key}": stats[key] / stats["pairs"] for key in VAL_KEYS}
    out[f"{prefix}/kl"] = stats["kl"] / max(stats["kl_tokens"], 1)
    return out


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """2B padded rows: the chosen conversations, then the rejected ones in the same order."""
    return pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


class PairBatches(SFTBatches):
    """Item k is micro-batch k of pairs, a pure function of (seed, k) as in SFT."""

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return collate_pairs([self.items[i] for i in self.indices(k)], self.pad_id)


class PairData(pl.LightningDataModule):
    def __init__(self, data: PreferenceData, micro_batch: int, accumulate: int, seed: int, pad_id: int):
        super().__init__()
        self.batches = PairBatches(data.train, micro_batch, seed, pad_id)
        self.val_sets, self.micro_batch, self.accumulate, self.pad_id = data.val, micro_batch, accumulate, pad_id

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step * self.accumulate if self.trainer else 0
        return DataLoader(self.batches, batch_size=None, sampler=FromStep(start))

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(pairs, batch_size=self.micro_batch, collate_fn=lambda b: collate_pairs(b, self.pad_id))
                for pairs in self.val_sets.values()]


@dataclass
class Tuned:
    model: nn.Module  # the peft policy; its adapter switched off is the reference (the SFT model)
    outcome: TrainOutcome
    metrics: dict[str, float]


def train_dpo(model: nn.Module, data: PreferenceData, pad_id: int, spec: TrainSpec, loss: DpoLoss, lora: LoraSpec,
              trainer: TrainerSpec, seed: int, checkpoint_dir: Path, log: Callable[[dict, int], None],
              write_text: Callable[[str, str], None]) -> Tuned:
    """Add a fresh adapter to ``model`` (the SFT model) and train it on ``data``'s pairs to ``spec.max_steps``,
    scoring the held-out pairs before (``before_<source>/...``) and after (``val_<source>/...``)."""
    pl.seed_everything(seed, verbose=False)
    policy = add_lora(model, lora)
    n_trainable, n_total, fraction = trainable_fraction(policy)
    print(f"dpo: LoRA: {n_trainable:,} of {n_total:,} parameters train ({fraction:.2%}); {len(data.train):,} "
          f"training pairs, {sum(len(v) for v in data.val.values())} held out; {loss.loss.value} loss, "
          f"beta {loss.beta}")
    module = DPOModule(policy, spec.optim, spec.max_steps, loss)
    batches = PairData(data, spec.micro_batch_size, spec.grad_accum, seed, pad_id)
    outcome = fit(module, batches, ["all", *data.val], {}, trainer, spec, checkpoint_dir, log=log,
                  write_text=write_text, evaluate_first=True,
                  tokens_per_step=batches.batches.tokens_per_micro_batch * spec.grad_accum)
    metrics = {"dpo/trainable_params": n_trainable, "dpo/total_params": n_total, "dpo/trainable_fraction": fraction}
    return Tuned(policy, outcome, metrics)

