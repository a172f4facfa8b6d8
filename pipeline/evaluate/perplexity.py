"""Perplexity and bits per byte of whole documents, scored with a sliding window.

A document longer than the model's context is scored in windows that advance ``stride`` tokens;
each token is scored once, with the up to ``context`` tokens before it that the window holds. A
stride equal to the context gives disjoint windows (fast; a window's first tokens see little
history); a smaller stride gives every token more history for proportionally more compute.

Each document is preceded by one prefix token (the document separator the model saw in training)
so its first token is scored too. Bits per byte divide the summed loss by the documents' UTF-8
bytes, which makes models with different tokenizers comparable; perplexity is per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# A causal LM as a function: token ids (batch, time) -> logits (batch, time, vocab).
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Window:
    doc: int  # index of the document
    begin: int  # the model reads ids[begin:end-1] of the prefixed document (at most `context` ids) ...
    end: int
    first_target: int  # ... and ids first_target .. end-1 are scored here


def windows(length: int, context: int, stride: int, doc: int = 0) -> list[Window]:
    """Windows over a prefixed document of ``length`` ids (prefix included) that score ids 1..length-1 once.

    The first window scores as many ids as the context holds; each later one scores the next
    ``stride`` ids, reading the ``context`` ids before its last one, so every scored id after the
    first window sees at least ``context - stride + 1`` ids of history.
    """
    assert 0 < stride <= context, (stride, context)
    out, scored_to = [], 1
    while scored_to < length:
        end = min(length, context + 1 if scored_to == 1 else scored_to + stride)
        out.append(Window(doc, max(0, end - 1 - context), end, scored_to))
        scored_to = end
    return out


@dataclass
class Totals:
    """Summed loss (nats) over scored tokens, and what it is divided by."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def add(self, other: "Totals") -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.documents += other.documents

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bpb(self) -> float:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else math.nan

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "ppl": self.ppl, "bpb": self.bpb, "tokens": self.tokens, "bytes": self.bytes,
                "documents": self.documents}


@dataclass
class DocumentScores:
    nll: np.ndarray  # per document, nats
    tokens: np.ndarray  # scored tokens per document
    bytes: np.ndarray  # UTF-8 bytes per document
    windows: int = 0

    def total(self, mask: np.ndarray | None = None) -> Totals:
        m = slice(None) if mask is None else mask
        return Totals(float(self.nll[m].sum()), int(self.tokens[m].sum()), int(self.bytes[m].sum()),
                      int(np.size(self.nll[m])))


def _batches(items: list[Window], size: int) -> Iterator[list[Window]]:
    # Longest windows first, so a batch holds windows of similar length (little padding) and the
    # first batch shows at once whether memory suffices.
    ordered = sorted(items, key=lambda w: w.end - w.begin, reverse=True)
    for i in range(0, len(ordered), size):
        yield ordered[i:i + size]


@torch.no_grad()
def score_documents(logits_fn: LogitsFn, token_ids: Sequence[Sequence[int]], n_bytes: Sequence[int], prefix_id: int,
                    context: int, stride: int, batch_size: int = 16, device: str | torch.device = "cpu",
                    progress: str | None = None) -> DocumentScores:
    """Summed negative log-likelihood of each document's tokens (the prefix is context only)."""
    docs = [np.concatenate([[prefix_id], np.asarray(ids, dtype=np.int64)]) for ids in token_ids]
    work = [w for i, ids in enumerate(docs) for w in windows(len(ids), context, stride, i)]
    nll = torch.zeros(len(docs), dtype=torch.float64)
    counts = np.array([len(ids) - 1 for ids in docs], dtype=np.int64)
    bar = tqdm(total=len(work), desc=progress, unit="window", disable=progress is None)
    for batch in _batches(work, batch_size):
        width = batch[0].end - batch[0].begin - 1  # inputs are ids[begin:end-1]; targets ids[begin+1:end]
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, w in enumerate(batch):
            ids = torch.from_numpy(docs[w.doc][w.begin:w.end])
            n = len(ids) - 1
            inputs[row, :n] = ids[:-1]
            keep = w.first_target - w.begin - 1  # targets before this were scored in an earlier window
            targets[row, keep:n] = ids[1 + keep:]
        logits = logits_fn(inputs.to(device)).float()
        losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.to(device).reshape(-1),
                                 ignore_index=-100, reduction="none").view(len(batch), width)
        nll.index_add_(0, torch.tensor([w.doc for w in batch]), losses.sum(dim=1).double().cpu())
        bar.update(len(batch))
    bar.close()
    return DocumentScores(nll.numpy(), counts, np.asarray(n_bytes, dtype=np.int64), windows=len(work))
