"""Batches of encoded SFT examples: padded one per row, or packed several to a row, and the loss on them.

Padding (``pad_batch``) gives each example a row of its own, right-padded to the batch's longest:
causal attention never looks right, so real tokens never see the pads and no mask is needed.

Packing (``pack``, ``collate_packed``) fills each row of ``context`` tokens with whole examples, so
a batch of short chats is not mostly padding. Each token carries its position inside its own example
(restarting at 0) and its example's segment id; ``GPT.forward(idx, positions=, segments=)`` turns
the segments into a block-diagonal causal mask, so every example is computed exactly as if it ran
alone: no attention to, and no position offset from, the examples packed before it.

The loss (``masked_loss``) is transformers' convention: labels are not shifted, logits at t are
scored against the label at t + 1, and -100 (``IGNORE``) marks tokens not trained.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from pipeline.sft.chat import IGNORE, Encoded

PAD_SEGMENT = -1  # the segment of padding: no real token shares it, so none attends to a pad


def pad_batch(examples: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` (batch, longest example), right-padded with ``pad_id`` and -100."""
    assert examples, "pad_batch needs at least one example"
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        assert len(e.ids) == len(e.labels), f"example {row}: {len(e.ids)} ids but {len(e.labels)} labels"
        ids[row, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        labels[row, :len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "labels": labels}


@dataclass
class PackedRow:
    """Whole examples laid end to end in one row of at most ``context`` tokens."""
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # inside each example: 0, 1, ... restarting per example
    segments: list[int] = field(default_factory=list)  # 0 for the row's first example, 1 for its second, ...
    sources: list[int] = field(default_factory=list)  # the index of each packed example in pack's input

    def add(self, example: Encoded, index: int) -> None:
        n, segment = len(example.ids), len(self.sources)
        # The label at the example's first token would be scored against the logits of the token
        # before it: the previous example's last token, which (masked) cannot see this example. That
        # target is unpredictable, and trains the previous example to guess what comes next in the
        # row; alone, the example's first label is never scored either (nothing precedes it).
        self.ids += example.ids
        self.labels += [IGNORE] + list(example.labels[1:])
        self.positions += range(n)
        self.segments += [segment] * n
        self.sources.append(index)


def pack(examples: Sequence[Encoded], context: int) -> list[PackedRow]:
    """Rows of at most ``context`` tokens holding whole examples, never one split across rows.

    Best-fit, deterministic, in the given order: each example goes to the open row with the least room
    that still holds it (the earliest such row on a tie), else opens a new row. It packs as densely as
    first-fit (both within 1.7x of the fewest rows possible), and finding the row is a bisection over
    rows sorted by free room, where first-fit scans every open row for each example. Rows come in the
    order they were opened, their examples in the given order. Examples must already be cut to
    ``context`` tokens (encode_conversation's ``max_tokens``); a longer one is an error.
    """
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []  # (room left, row index) of rows with room, sorted
    for index, example in enumerate(examples):
        n = len(example.ids)
        assert n == len(example.labels), f"example {index}: {n} ids but {len(example.labels)} labels"
        assert 0 < n <= context, f"example {index} has {n} tokens; each must have 1 to context={context}"
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = context, len(rows)
            rows.append(PackedRow())
        rows[row].add(example, index)
        if room > n:
            bisect.insort(free, (room - n, row))
    return rows


def collate_packed(rows: Sequence[PackedRow], pad_id: int, context: Optional[int] = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels``, ``positions``, ``segments`` (batch, length) for ``GPT.forward`` and ``masked_loss``.

    length: ``context`` when given (every batch the same shape), else the longest row. The tail of a
    row is padding: ``pad_id``, label -100, positions 0, 1, ... and segment -1, which no real token
    shares, so none attends to a pad (and each pad sees itself, so no attention row is empty).
    """
    assert rows, "collate_packed needs at least one row"
    length = context or max(len(r.ids) for r in rows)
    assert all(len(r.ids) <= length for r in rows), \
        f"a row has {max(len(r.ids) for r in rows)} tokens, more than the length {length}"
    batch = {name: torch.full((len(rows), length), fill, dtype=torch.long)
             for name, fill in (("input_ids", pad_id), ("labels", IGNORE), ("segments", PAD_SEGMENT))}
    batch["positions"] = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        batch["input_ids"][i, :n] = torch.tensor(r.ids, dtype=torch.long)
        batch["labels"][i, :n] = torch.tensor(r.labels, dtype=torch.long)
        batch["positions"][i, :n] = torch.tensor(r.positions, dtype=torch.long)
        batch["positions"][i, n:] = torch.arange(length - n)
        batch["segments"][i, :n] = torch.tensor(r.segments, dtype=torch.long)
    return batch


def packing_stats(examples: Sequence[Encoded], rows: Sequence[PackedRow], context: int,
                  batch_size: Optional[int] = None) -> dict[str, float]:
    """How much of the token slots the model computes on hold real tokens, packed against padded.

    fill: real tokens / (rows * context). padded_fill: the same without packing, one example per row,
    each batch of ``batch_size`` (in the given order) padded to its longest, as pad_batch does; without
    ``batch_size``, every row padded to ``context``. speedup = fill / padded_fill: how many times fewer
    slots packing computes for the same examples (attention's cost per slot aside).
    """
    lengths = [len(e.ids) for e in examples]
    real = sum(lengths)
    assert real == sum(len(r.ids) for r in rows), "rows do not hold exactly the tokens of the examples"
    if batch_size:
        batches = (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size))
        padded_slots = sum(len(b) * max(b) for b in batches)
    else:
        padded_slots = len(lengths) * context
    fill = real / (len(rows) * context)
    padded_fill = real / padded_slots
    return {"examples": len(examples), "rows": len(rows), "real_tokens": real, "fill": fill,
            "padded_fill": padded_fill, "speedup": fill / padded_fill}


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits[:, :-1] against labels[:, 1:], -100 ignored, computed in float32.

    reduction "sum" returns the total; to average over several batches (or micro-batches), add their
    sums and divide by the trained-token count ``(labels[:, 1:] != -100).sum()``, so every trained
    token weighs the same whichever batch it sits in. "mean" is NaN when no token is trained.
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)
