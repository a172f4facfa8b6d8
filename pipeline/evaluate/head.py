"""Fine-tuning of the third kind: a trained model, frozen, with a new linear task head on its final hidden
state; beside it the same model with LoRA adapters and a head, both trained; and the prompting accuracy
of the same model, in one table (SST-2 sentiment).

Each sentence is encoded as documents are in training: ``prefix_id`` (the EOS) first, then its tokens;
ids beyond the model's context are cut from the end (a document's first window keeps its start too).
The feature of a sentence is the final hidden state (after the final norm: what the LM head reads),
averaged over the sentence's positions (the prefix included, padding not) or taken at its last token, per
``HeadSpec.pooling``. Our GPT's is caught by a forward hook on its final norm; a transformers causal LM's
is its backbone's ``last_hidden_state`` (the last of ``output_hidden_states``).

frozen + head  The model never changes, so features are computed once; a linear head on standardised
               features (the training subset's mean and spread) trains with cross-entropy for ``epochs``:
               a logistic-regression probe of what the model already represents.
LoRA + head    A deep copy of the model gets LoRA adapters on its attention projections
               (pipeline/sft/lora.py) and a head on the same standardisation, by default the trained frozen
               head (``lora_head``); adapters and head train together for ``lora_steps``. The copy is dropped
               after, so the evaluated model is untouched.

Both train on the same ``train_limit`` sentences drawn with ``seed``; dev and test are scored whole, or
their first ``eval_limit`` rows (as prompting's ``limit`` takes its first rows). The majority baseline
answers the training subset's most frequent label. With the same seed a rerun gives the same numbers
on the same machine (Lightning's seed_everything, and seeded generators for every shuffle).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from tqdm.auto import tqdm

from pipeline.errors import BadInput
from pipeline.evaluate.models import ScoredModel
from pipeline.evaluate.prompting import Example, read_sst2
from pipeline.evaluate.spec import HeadSpec
from pipeline.sft.lora import LoraSpec, add_lora, trainable_fraction

N_LABELS = 2  # SST-2: 0 negative, 1 positive


@dataclass
class HeadResult:
    """Accuracies of one model's two classifiers, their baselines and what they cost."""

    frozen_dev: float
    frozen_test: float
    lora_dev: Optional[float]  # None when HeadSpec.lora is off
    lora_test: Optional[float]
    majority_dev: float  # always the training subset's most frequent label
    majority_test: float
    n_train: int
    n_dev: int
    n_test: int
    truncated: int  # sentences longer than the context, cut (train, dev and test together)
    frozen_train_loss: float  # mean cross-entropy of the last epoch's batches
    lora_train_loss: Optional[float]  # mean cross-entropy of the last 10 steps
    lora_trainable: int  # parameters LoRA + head trains
    head_trainable: int  # parameters the frozen model's head trains
    features_seconds: float
    frozen_seconds: float
    lora_seconds: float

    def metrics(self, model: str) -> dict[str, float]:
        out = {f"head/{model}/frozen/dev_accuracy": self.frozen_dev,
               f"head/{model}/frozen/test_accuracy": self.frozen_test,
               f"head/{model}/majority/dev_accuracy": self.majority_dev,
               f"head/{model}/majority/test_accuracy": self.majority_test,
               f"head/{model}/n_train": self.n_train, f"head/{model}/truncated": self.truncated,
               f"head/{model}/seconds": self.features_seconds + self.frozen_seconds + self.lora_seconds}
        if self.lora_dev is not None:
            out[f"head/{model}/lora/dev_accuracy"] = self.lora_dev
            out[f"head/{model}/lora/test_accuracy"] = self.lora_test
            out[f"head/{model}/lora/trainable_params"] = self.lora_trainable
        return out


# ---- data -------------------------------------------------------------------------------------

@dataclass
class Sentences:
    """Encoded sentences (prefix first, cut to the context) and their labels."""

    ids: list[list[int]]
    labels: torch.Tensor  # (n,) int64
    truncated: int


def read_split(path: Optional[str], key: str) -> list[Example]:
    if path is None:
        raise BadInput(f"evaluate.head.{key} is not set: point it at an SST-2 file (sentence<TAB>label)")
    examples = read_sst2(Path(path))
    if not examples:
        raise BadInput(f"{path} holds no examples (evaluate.head.{key})")
    return examples


def draw_subset(examples: Sequence[Example], limit: Optional[int], seed: int) -> list[Example]:
    """``limit`` examples drawn without replacement with ``seed``, in file order; all when ``limit`` is None
    or not smaller than the file."""
    if limit is None or limit >= len(examples):
        return list(examples)
    picks = np.sort(np.random.default_rng(seed).choice(len(examples), size=limit, replace=False))
    return [examples[int(i)] for i in picks]


def encode_sentences(model: ScoredModel, examples: Sequence[Example]) -> Sentences:
    ids, truncated = [], 0
    for tokens in model.encode([e.fields["sentence"] for e in examples]):
        seq = [model.prefix_id, *tokens]
        truncated += len(seq) > model.context
        ids.append(seq[:model.context])
    return Sentences(ids, torch.tensor([e.label for e in examples], dtype=torch.long), truncated)


def pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (batch, longest) and the mask of real tokens; the models are causal, so padding
    after a sentence never changes its hidden states."""
    width = max(len(s) for s in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for row, s in enumerate(ids):
        out[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = True
    return out, mask


# ---- features ---------------------------------------------------------------------------------

class _Reached(Exception):
    """Raised by the hook on the final norm, carrying its output, to end the forward pass there: the LM
    head's product over the vocabulary (two fifths of the demo model's work) is not needed."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("final norm reached")
        self.hidden = hidden


def _stop_at(module, args, output):
    raise _Reached(output)


def _unwrapped(network: nn.Module) -> nn.Module:
    return network.get_base_model() if hasattr(network, "get_base_model") else network  # through a peft wrapper


def final_hidden_states(network: nn.Module, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, time, d_model): the hidden states the LM head reads, after the final norm.

    Our GPT runs until its final norm (a forward hook ends the pass there); a transformers causal LM runs its
    backbone (``base_model``, e.g. GPT-2's ``transformer``), whose ``last_hidden_state`` is the last of
    ``output_hidden_states``, without the LM head.
    """
    base = _unwrapped(network)
    if kind == "transformers":
        backbone = base.base_model
        assert backbone is not base, f"{type(base).__name__} has no backbone (base_model) under its LM head"
        return backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert kind == "pipeline", kind
    assert hasattr(base, "norm"), f"{type(base).__name__} has no final norm `norm`; is it pipeline.model.gpt.GPT?"
    handle = base.norm.register_forward_hook(_stop_at)
    try:
        network(ids)
    except _Reached as reached:
        return reached.hidden
    finally:
        handle.remove()
    raise AssertionError(f"{type(base).__name__}'s forward pass never reached its final norm")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, d_model): each row's last real position, or the mean over its real positions."""
    mask = mask.to(hidden.device)
    if pooling == "last":
        last = mask.sum(1) - 1
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    assert pooling == "mean", pooling
    weights = mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(1) / weights.sum(1)


def sentence_features(network: nn.Module, kind: str, ids: Sequence[Sequence[int]], pad_id: int, pooling: str,
                      batch_size: int, device, progress: Optional[str] = None) -> torch.Tensor:
    """(n, d_model) float32 features on the CPU, one per sentence, in the order given; batches hold
    sentences of similar length."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    out: list[Optional[torch.Tensor]] = [None] * len(ids)
    starts = range(0, len(order), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None):
            chosen = order[start:start + batch_size]
            batch, mask = pad([ids[i] for i in chosen], pad_id)
            features = pool(final_hidden_states(network, kind, batch.to(device), mask.to(device)), mask, pooling)
            for i, f in zip(chosen, features.float().cpu()):
                out[i] = f
    return torch.stack(out)


# ---- classifiers ------------------------------------------------------------------------------

class LinearHead(nn.Module):
    """Standardise a feature with fixed statistics, then one linear layer to label logits."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.linear = nn.Linear(len(mean), N_LABELS)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.std)


def standardisation(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and spread of the training features; a constant dimension keeps spread 1."""
    std = features.std(0)
    return features.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std))


class HeadTraining(pl.LightningModule):
    """Trains ``head`` on precomputed features; the model they came from is not part of it."""

    def __init__(self, head: LinearHead, lr: float, weight_decay: float):
        super().__init__()
        self.head, self.lr, self.weight_decay = head, lr, weight_decay
        self.epoch_losses: list[float] = []

    def on_train_epoch_start(self) -> None:
        self.epoch_losses = []

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        features, labels = batch
        loss = F.cross_entropy(self.head(features), labels)
        self.epoch_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class LoraTraining(pl.LightningModule):
    """Trains the adapters of ``network`` (a peft model) and ``head`` together, end to end on token ids."""

    def __init__(self, network: nn.Module, kind: str, head: LinearHead, pooling: str, lr: float,
                 weight_decay: float):
        super().__init__()
        self.network, self.kind, self.head, self.pooling = network, kind, head, pooling
        self.lr, self.weight_decay = lr, weight_decay
        self.losses: list[float] = []

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(pool(final_hidden_states(self.network, self.kind, ids, mask), mask, self.pooling))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ids, mask, labels = batch
        loss = F.cross_entropy(self(ids, mask), labels)
        self.losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    def configure_optimizers(self):
        trained = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trained, lr=self.lr, weight_decay=self.weight_decay)


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's banner (GPU available, ...) for each of the two Trainers per model, and its advice to use
    more loader workers (the data is in memory), say nothing here."""
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")  # Lightning 2.6 on torch 2.13
            yield
    finally:
        logger.setLevel(level)


def _trainer(device, work_dir: Path, progress: bool, **limits) -> pl.Trainer:
    """A one-device Trainer that writes nothing: no logger, no checkpoints, its root inside ``work_dir``."""
    return pl.Trainer(accelerator="gpu" if str(device).startswith("cuda") else "cpu", devices=1,
                      precision="32-true", logger=False, enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=progress, num_sanity_val_steps=0, limit_val_batches=0,
                      use_distributed_sampler=False, default_root_dir=str(work_dir), **limits)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    head.eval()
    predicted = head(features.to(next(head.parameters()).device)).argmax(-1).cpu()
    return float((predicted == labels).float().mean())


def train_frozen_head(train_x: torch.Tensor, train_y: torch.Tensor, spec: HeadSpec, work_dir: Path,
                      device) -> tuple[LinearHead, float]:
    """A linear head on fixed features, and the mean loss of its last epoch."""
    pl.seed_everything(spec.seed, verbose=False)
    head = LinearHead(*standardisation(train_x))
    module = HeadTraining(head, spec.lr, spec.weight_decay)
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=spec.batch_size, shuffle=True,
                        generator=_generator(spec.seed))
    with _quiet_lightning():
        _trainer(device, work_dir, progress=False, max_epochs=spec.epochs).fit(module, loader)
    return head.cpu(), float(np.mean(module.epoch_losses))


class LengthBuckets(Sampler):
    """Batches of sentences of similar length, in random order, so that padding costs little (random batches
    of SST-2 pad to twice their tokens). Each pass permutes the sentences with a generator seeded by
    (seed, pass), sorts each window of ``window`` batches by length, cuts it into batches and permutes those."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 16):
        self.lengths, self.batch_size, self.seed, self.window = list(lengths), batch_size, seed, window
        self.passes = 0

    def __len__(self) -> int:
        span = self.batch_size * self.window
        full, rest = divmod(len(self.lengths), span)
        return full * self.window + -(-rest // self.batch_size)

    def __iter__(self):
        generator = _generator(self.seed * 1_000_003 + self.passes)
        self.passes += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            window = sorted(order[start:start + span], key=lambda i: self.lengths[i])
            batches += [window[k:k + self.batch_size] for k in range(0, len(window), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]


def _collate(pad_id: int):
    def collate(items):
        ids, mask = pad([ids for ids, _ in items], pad_id)
        return ids, mask, torch.tensor([label for _, label in items], dtype=torch.long)
    return collate


def train_lora_head(model: ScoredModel, train: Sentences, frozen_head: LinearHead, spec: HeadSpec, work_dir: Path,
                    device) -> tuple[LoraTraining, float]:
    """A deep copy of ``model.network`` with adapters, and a head, trained together for ``spec.lora_steps``; and
    the mean loss of the last 10 steps. ``model`` itself is not touched.

    The head starts as a copy of ``frozen_head`` (``lora_head: frozen``: linear probing, then fine-tuning, as
    Kumar et al. 2022 recommend, so a few steps start from the probe's solution, not from a random head whose
    gradients would first disturb the features) or fresh on its standardisation (``lora_head: fresh``).
    """
    pl.seed_everything(spec.seed, verbose=False)
    network = add_lora(copy.deepcopy(model.network), LoraSpec(rank=spec.lora_r, alpha=spec.lora_alpha))
    head = copy.deepcopy(frozen_head) if spec.lora_head == "frozen" else LinearHead(frozen_head.mean, frozen_head.std)
    module = LoraTraining(network, model.kind, head, spec.pooling, spec.lora_lr, spec.weight_decay)
    sampler = LengthBuckets([len(s) for s in train.ids], spec.batch_size, spec.seed)
    loader = DataLoader(list(zip(train.ids, train.labels.tolist())), batch_sampler=sampler,
                        collate_fn=_collate(model.prefix_id))
    with _quiet_lightning():
        trainer = _trainer(device, work_dir, progress=True, max_steps=spec.lora_steps,
                           max_epochs=-(-spec.lora_steps // len(sampler)))
        trainer.fit(module.train(), loader)
    return module, float(np.mean(module.losses[-10:]))


@torch.no_grad()
def lora_accuracy(module: LoraTraining, split: Sentences, pad_id: int, batch_size: int, device) -> float:
    module.eval().to(device)
    features = sentence_features(module.network, module.kind, split.ids, pad_id, module.pooling, batch_size, device)
    return accuracy(module.head, features, split.labels)


def _majority(train_y: torch.Tensor) -> int:
    return int(torch.bincount(train_y, minlength=N_LABELS).argmax())  # ties: the lowest label


@contextlib.contextmanager
def _random_state_kept():
    """Python's, numpy's and torch's (CPU and every CUDA device's) generators as they were before, and no
    PL_GLOBAL_SEED left behind: seed_everything here must not reseed what the caller does next."""
    py, npy, seed_env = random.getstate(), np.random.get_state(), os.environ.get("PL_GLOBAL_SEED")
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        if seed_env is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = seed_env


def train_heads(model: ScoredModel, spec: HeadSpec, work_dir: Path, device="cpu") -> HeadResult:
    """Both classifiers of ``model`` on SST-2, trained and scored; ``model`` is left as it was, and so are the
    random generators (the training seeds its own from ``spec.seed``).

    ``work_dir`` is Lightning's root directory (nothing is written there: no logger, no checkpoints).
    """
    with _random_state_kept():
        return _train_heads(model, spec, work_dir, device)


def _train_heads(model: ScoredModel, spec: HeadSpec, work_dir: Path, device) -> HeadResult:
    if model.network is None or model.kind not in ("pipeline", "transformers"):
        raise BadInput(f"model {model.name}: a task head needs the loaded network (kind pipeline or transformers), "
                       f"got kind {model.kind!r} with network {type(model.network).__name__}")
    work_dir = Path(work_dir)
    train = encode_sentences(model, draw_subset(read_split(spec.train_path, "train_path"), spec.train_limit,
                                                spec.seed))
    dev, test = (encode_sentences(model, read_split(path, key)[:spec.eval_limit])
                 for path, key in ((spec.dev_path, "dev_path"), (spec.test_path, "test_path")))

    started = time.perf_counter()
    features = {name: sentence_features(model.network, model.kind, split.ids, model.prefix_id, spec.pooling,
                                        spec.batch_size, device, progress=f"{model.name}: {name} features")
                for name, split in (("train", train), ("dev", dev), ("test", test))}
    features_seconds = time.perf_counter() - started

    started = time.perf_counter()
    head, frozen_loss = train_frozen_head(features["train"], train.labels, spec, work_dir, device)
    frozen_dev, frozen_test = accuracy(head, features["dev"], dev.labels), accuracy(head, features["test"], test.labels)
    frozen_seconds = time.perf_counter() - started

    lora_dev = lora_test = lora_loss = None
    lora_trainable, lora_seconds = 0, 0.0
    if spec.lora:
        started = time.perf_counter()
        module, lora_loss = train_lora_head(model, train, head, spec, work_dir, device)
        lora_dev, lora_test = (lora_accuracy(module, split, model.prefix_id, spec.batch_size, device)
                               for split in (dev, test))
        lora_trainable = trainable_fraction(module)[0]
        del module
        lora_seconds = time.perf_counter() - started

    majority = _majority(train.labels)
    return HeadResult(
        frozen_dev=frozen_dev, frozen_test=frozen_test, lora_dev=lora_dev, lora_test=lora_test,
        majority_dev=float((dev.labels == majority).float().mean()),
        majority_test=float((test.labels == majority).float().mean()),
        n_train=len(train.ids), n_dev=len(dev.ids), n_test=len(test.ids),
        truncated=train.truncated + dev.truncated + test.truncated, frozen_train_loss=frozen_loss,
        lora_train_loss=lora_loss, lora_trainable=lora_trainable,
        head_trainable=sum(p.numel() for p in head.parameters()), features_seconds=features_seconds,
        frozen_seconds=frozen_seconds, lora_seconds=lora_seconds)


# ---- report -----------------------------------------------------------------------------------

def head_report(results: Sequence[tuple[str, HeadResult]], prompting: Mapping[str, float], spec: HeadSpec,
                prompting_examples: Optional[int] = None) -> tuple[str, dict[str, float]]:
    """(Markdown, metrics): SST-2 accuracy per model by prompting (0-shot, on dev), frozen + linear head and
    LoRA + head (dev and test), with the majority baseline beside. ``prompting`` maps a model to its 0-shot
    accuracy (a model missing from it gets an empty cell); ``prompting_examples`` is how many dev rows
    that accuracy is over."""
    def cell(dev: Optional[float], test: Optional[float]) -> str:
        return "" if dev is None else f"{dev:.3f} / {test:.3f}"

    lines = ["| model | prompting, 0-shot (dev) | frozen + linear head (dev / test) | LoRA + head (dev / test) "
             "| majority (dev / test) | seconds |", "|---|---|---|---|---|---|"]
    metrics: dict[str, float] = {}
    for name, r in results:
        shown = f"{prompting[name]:.3f}" if name in prompting else ""
        seconds = r.features_seconds + r.frozen_seconds + r.lora_seconds
        lines.append(f"| {name} | {shown} | {cell(r.frozen_dev, r.frozen_test)} | {cell(r.lora_dev, r.lora_test)} "
                     f"| {cell(r.majority_dev, r.majority_test)} | {seconds:.1f} |")
        metrics.update(r.metrics(name))
        if name in prompting:
            metrics[f"head/{name}/prompting/dev_accuracy"] = prompting[name]
    if not results:
        return "", metrics
    first = results[0][1]
    cut = sum(r.truncated for _, r in results)
    start = "the frozen head" if spec.lora_head == "frozen" else "a fresh head"
    lora = (f"LoRA + head: rank {spec.lora_r} (alpha {spec.lora_alpha}) on the attention projections, the head "
            f"starting as {start}, {spec.lora_steps} steps of {spec.batch_size} at lr {spec.lora_lr}"
            if spec.lora else "LoRA + head: off")
    notes = [f"Trained on {first.n_train:,} SST-2 training sentences drawn with seed {spec.seed}; scored on "
             f"{first.n_dev:,} dev and {first.n_test:,} test sentences"
             + (f" (prompting: the first {prompting_examples:,} dev sentences)" if prompting_examples else "") + ".",
             f"Features: the final hidden state ({spec.pooling} pooling). Frozen + head: {spec.epochs} epochs at "
             f"lr {spec.lr}. {lora}. Majority: the training subset's most frequent label."
             + (f" {cut} sentences were longer than the context and cut." if cut else "")]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n", metrics
