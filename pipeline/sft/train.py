"""Fine-tuning on encoded conversations: the LightningModule and the batches it trains on.

``SFTModule`` trains whatever parameters of ``model`` require gradients: the adapters of a LoRA model
(peft freezes the rest), or every weight for full fine-tuning. The loss is next-token cross-entropy on
the trained tokens only (labels of -100 are ignored). A LoRA run's checkpoints hold only the adapter
weights and the optimizer state: the frozen base comes from the upstream model on resume.

``SFTBatches`` makes micro-batch k a pure function of (seed, k), as the pretraining windows are, so a
run resumed at step s sees the batches an uninterrupted run would: each pass over the data is its own
seeded permutation, of examples (padded to the longest of the micro-batch) or of packed rows.

``fine_tune`` is one run: the adapters added, the module and batches built, ``pipeline.train.run.fit``
(which resumes from the newest checkpoint); ``publish_tuned`` writes what it leaves behind.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import BadInput
from pipeline.model.io import ADAPTER, CHAT_TEMPLATE, TOKENIZER, keep_checkpoints, publish_model
from pipeline.sft.batching import collate_packed, masked_loss, pack, packing_stats, pad_batch
from pipeline.sft.chat import IGNORE, ChatTemplate, Encoded, get_template
from pipeline.sft.examples import Examples
from pipeline.sft.lora import LoraSpec, add_lora, save_adapter, trainable_fraction
from pipeline.train.data import FromStep
from pipeline.train.module import LRSchedule, OptimSpec
from pipeline.train.run import TrainerSpec, TrainOutcome, TrainSpec, fit


def trainable_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The parameters that train: matrices decay, vectors (norms, biases) and embedding rows do not;
    frozen ones are left out."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            rows = id(p) in embeddings or "trainable_tokens_delta" in name  # peft's trained token rows
            (decay if p.dim() >= 2 and not rows else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SFTModule(pl.LightningModule):
    """``model`` is our GPT, or a peft model wrapping it; batches are dicts from ``SFTBatches``."""

    def __init__(self, model: nn.Module, optim: OptimSpec, max_steps: int, adapters_only: bool):
        super().__init__()
        self.model = model
        self.optim_spec, self.max_steps, self.adapters_only = optim, max_steps, adapters_only
        # A LoRA checkpoint leaves out the frozen base (see on_save_checkpoint): loading it is not strict.
        self.strict_loading = not adapters_only
        self.grad_norm: Optional[float] = None
        self.val_sums: dict[int, list[float]] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], positions=batch.get("positions"), segments=batch.get("segments"))[0]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = masked_loss(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        self.grad_norm = float(torch.stack(norms).norm()) if norms else 0.0

    def on_validation_epoch_start(self) -> None:
        self.val_sums = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        sums = self.val_sums.setdefault(dataloader_idx, [0.0, 0])
        sums[0] += float(masked_loss(self(batch), batch["labels"], reduction="sum"))
        sums[1] += int((batch["labels"][:, 1:] != IGNORE).sum())

    def val_losses(self) -> dict[int, float]:
        """Mean nats per trained token of the last validation pass: index 0 over every loader together,
        index i + 1 for loader i (so the sets are named ``["all", *loaders]``)."""
        total, count = (sum(s[k] for s in self.val_sums.values()) for k in (0, 1))
        each = {i + 1: t / c for i, (t, c) in self.val_sums.items() if c}
        return {0: total / count, **each} if count else {}

    def configure_optimizers(self):
        s = self.optim_spec
        optimizer = torch.optim.AdamW(trainable_groups(self.model, s.weight_decay), lr=s.lr, betas=tuple(s.betas),
                                      eps=s.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(s, self.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.adapters_only:
            trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}


class SFTBatches(Dataset):
    """Item k is micro-batch k: a dict of input_ids and labels (and positions, segments when packed)."""

    def __init__(self, examples: Sequence[Encoded], micro_batch: int, seed: int, pad_id: int,
                 pack_context: Optional[int] = None):
        self.micro_batch, self.seed, self.pad_id, self.pack_context = micro_batch, seed, pad_id, pack_context
        self.items = pack(examples, pack_context) if pack_context else list(examples)
        if len(self.items) < micro_batch:
            what = "packed rows" if pack_context else "training examples"
            raise BadInput(f"{len(self.items)} {what}, fewer than one micro-batch of {micro_batch}: lower "
                             f"micro_batch_size or add data")
        self.per_pass = len(self.items) // micro_batch  # the remainder of a pass is left for the next permutation
        self.tokens_per_micro_batch = sum(len(item.ids) for item in self.items) / len(self.items) * micro_batch

    def __len__(self) -> int:
        return 2**62  # endless; the trainer stops at max_steps

    def indices(self, k: int) -> np.ndarray:
        epoch, position = divmod(k, self.per_pass)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return order[position * self.micro_batch:(position + 1) * self.micro_batch]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        chosen = [self.items[i] for i in self.indices(k)]
        if self.pack_context:
            return collate_packed(chosen, self.pad_id, self.pack_context)
        return pad_batch(chosen, self.pad_id)


class SFTData(pl.LightningDataModule):
    """Training batches, and one validation loader per held-out set (padded, in order)."""

    def __init__(self, train: Sequence[Encoded], val_sets: dict[str, list[Encoded]], micro_batch: int,
                 accumulate: int, seed: int, pad_id: int, pack_context: Optional[int] = None):
        super().__init__()
        self.batches = SFTBatches(train, micro_batch, seed, pad_id, pack_context)
        self.val_sets, self.micro_batch, self.accumulate, self.pad_id = val_sets, micro_batch, accumulate, pad_id

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step * self.accumulate if self.trainer else 0  # after a restored checkpoint
        return DataLoader(self.batches, batch_size=None, sampler=FromStep(start))

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(examples, batch_size=self.micro_batch, collate_fn=lambda b: pad_batch(b, self.pad_id))
                for examples in self.val_sets.values()]


@dataclass
class FineTuned:
    model: nn.Module  # peft's model around the base (LoRA), or the base itself, trained in place
    outcome: TrainOutcome
    metrics: dict[str, float]  # sft/ trainable parameters, and data/ packing fill when packing


def fine_tune(model: nn.Module, examples: Examples, spec: TrainSpec, lora: Optional[LoraSpec], trainer: TrainerSpec,
              seed: int, checkpoint_dir: Path, log: Callable[[dict, int], None],
              write_text: Callable[[str, str], None], packing: bool = False) -> FineTuned:
    """Train ``model`` (with the adapters of ``lora``; None: every weight) on ``examples`` to ``spec.max_steps``,
    with ``packing`` several conversations per row.

    The held-out sets are scored before training (``before_<source>/loss``) and after (``val_<source>/loss``);
    ``val/loss`` and ``before/loss`` are every source together.
    """
    pl.seed_everything(seed, verbose=False)  # the same adapter initialisation on every run
    trained = add_lora(model, lora) if lora else model
    n_trainable, n_total, fraction = trainable_fraction(trained)
    train = examples.train_examples
    print(f"sft: {'LoRA' if lora else 'full fine-tuning'}: {n_trainable:,} of {n_total:,} parameters train "
          f"({fraction:.2%}); {len(train):,} training conversations, "
          f"{sum(len(v) for v in examples.val.values())} held out")
    module = SFTModule(trained, spec.optim, spec.max_steps, adapters_only=lora is not None)
    data = SFTData(train, examples.val, spec.micro_batch_size, spec.grad_accum, seed, examples.pad_id,
                   pack_context=examples.max_tokens if packing else None)
    metrics = {"sft/trainable_params": n_trainable, "sft/total_params": n_total, "sft/trainable_fraction": fraction}
    if packing:
        metrics.update(packing_metrics(train, data.batches, examples.max_tokens))
    # "all" first: val/loss is every source together (SFTModule.val_losses), then val_<source>/loss
    outcome = fit(module, data, ["all", *examples.val], {}, trainer, spec, checkpoint_dir, log=log,
                  write_text=write_text, evaluate_first=True,
                  tokens_per_step=data.batches.tokens_per_micro_batch * spec.grad_accum)
    return FineTuned(trained, outcome, metrics)


def packing_metrics(examples: Sequence[Encoded], batches: SFTBatches, context: int) -> dict[str, float]:
    """How full the packed rows are, against padding each micro-batch to its longest example."""
    stats = packing_stats(examples, batches.items, context, batch_size=batches.micro_batch)
    print(f"sft: packing {len(examples):,} conversations into {stats['rows']:,} rows of {context} tokens: "
          f"{stats['fill']:.0%} of each row is real tokens, against {stats['padded_fill']:.0%} when padded")
    return {"data/packed_rows": stats["rows"], "data/packing_fill": stats["fill"],
            "data/padded_fill": stats["padded_fill"]}


def publish_tuned(model: nn.Module, lora: Optional[LoraSpec], template: Union[str, ChatTemplate],
                  tokenizer_json: Path, checkpoint_dir: Path, out_dir: Path) -> dict:
    """The adapter (fully fine-tuned: the whole model), tokenizer.json, the chat template, the kept checkpoints.

    Returns the manifest's ``outputs`` entries; ``lora`` records the adapter's settings (None: full fine-tuning).
    """
    template = get_template(template)
    if lora is None:
        outputs = publish_model(model, tokenizer_json, out_dir, checkpoint_dir=checkpoint_dir,
                                chat_template=template.source)
    else:
        save_adapter(model, out_dir / ADAPTER)  # megabytes: the base stays where outputs.base says
        shutil.copy2(tokenizer_json, out_dir / TOKENIZER)
        (out_dir / CHAT_TEMPLATE).write_text(template.source)
        outputs = {"adapter": ADAPTER, "tokenizer": TOKENIZER, "chat_template": CHAT_TEMPLATE,
                   "checkpoints": keep_checkpoints(checkpoint_dir, out_dir / "checkpoints")}
    return {**outputs, "template": template.name, "lora": asdict(lora) if lora else None}
