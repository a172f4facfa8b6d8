"""The examples of one fine-tuning run: the instruction sources read, held out and mixed, then encoded.

``build_examples`` reads every source (pipeline/sft/data.py), holds out ``val_fraction`` of each by
content hash, mixes the rest by weight, and encodes both parts with the chat template
(pipeline/sft/chat.py), cut to the window. ``Examples`` then answers what the run trains and scores
on, and the counts and ``data/...`` metrics of what was read, kept, cut and dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Protocol, Union

from tokenizers import Tokenizer

from pipeline.errors import BadInput
from pipeline.sft.chat import ChatTemplate, Encoded, encode_all
from pipeline.sft.data import Conversation, Mixture, ReadResult, mixture, read_source
from pipeline.tokenizer.build import SpecialTokens

SKIPPED = ("truncated", "dropped_too_long", "dropped_no_trained_tokens")  # encode_all's counts, per source


class InstructionSource(Protocol):
    """One instruction dataset as ``sft.sources.<name>`` gives it."""

    format: str  # the reader: pipeline.sft.data.READERS
    path: str
    weight: float  # share of its training part used per pass
    options: dict  # the reader's keyword arguments


def window(max_tokens: Optional[int], context: int) -> int:
    """Tokens a conversation may take: ``max_tokens``, at most the model's context (None: the context)."""
    return min(max_tokens or context, context)


def read_sources(sources: Mapping[str, InstructionSource]) -> dict[str, ReadResult]:
    """Every source read by its format's reader; bad records are counted in each result, not raised."""
    if not sources:
        raise BadInput("sft.sources is empty: name instruction data, e.g. "
                       "+sft.sources.alpaca={format: alpaca, path: <file>}")
    return {name: read_source(s.format, s.path, name, **s.options) for name, s in sources.items()}


def bad_summary(result: ReadResult) -> str:
    """``reason count, ...`` of a source's skipped records."""
    return ", ".join(f"{k} {v}" for k, v in sorted(result.bad.items()))


@dataclass
class Examples:
    tokenizer: Tokenizer
    pad_id: int
    max_tokens: int  # the window every example was cut to
    read: dict[str, ReadResult]
    mix: Mixture
    train: dict[str, list[Encoded]]  # per source, in the mixture's order
    val: dict[str, list[Encoded]]  # per source that kept any, at most val_max_per_source each
    encoded: dict[str, dict[str, dict]]  # "train" | "val" -> source -> encode_all's counts

    @property
    def train_examples(self) -> list[Encoded]:
        return [e for name in self.train for e in self.train[name]]

    def prompts(self, per_source: int) -> list[Conversation]:
        """The first ``per_source`` scored held-out conversations of each source, to answer and compare."""
        held = {c.id: c for conversations in self.mix.val.values() for c in conversations}
        return [held[e.id] for name in self.val for e in self.val[name][:per_source]]

    def metrics(self) -> dict[str, float]:
        """Per source: records read, bad, examples kept per split, and cut or dropped; in all: what trains."""
        train, val = self.encoded["train"], self.encoded["val"]
        out = {}
        for name, result in self.read.items():
            out[f"data/{name}/read"] = len(result.conversations)
            out[f"data/{name}/bad_records"] = sum(result.bad.values())
            out[f"data/{name}/train_examples"] = train[name]["kept"]
            out[f"data/{name}/val_examples"] = val[name]["kept"]
            for key in SKIPPED:
                out[f"data/{name}/{key}"] = train[name][key] + val[name][key]
        out["data/train_examples"] = sum(c["kept"] for c in train.values())
        out["data/train_tokens"] = sum(c["tokens"] for c in train.values())
        out["data/trained_tokens"] = sum(c["trained_tokens"] for c in train.values())
        return out

    def counts(self) -> dict:
        """For the manifest: the mixture's counts, bad records by reason, and encode_all's counts per split."""
        return {"mixture": self.mix.counts, "bad_records": {name: r.bad for name, r in self.read.items()},
                "encoded": self.encoded}

    def bad_records(self) -> dict:
        """Per source with bad records: their counts by reason and the first few of them."""
        return {name: {"counts": r.bad, "examples": r.bad_examples} for name, r in self.read.items() if r.bad}


def build_examples(sources: Mapping[str, InstructionSource], tokenizer_json: Path, context: int,
                   special: SpecialTokens, seed: int, *, template: Union[str, ChatTemplate], max_tokens: Optional[int],
                   val_fraction: float, val_max_per_source: int, drop_truncated: bool) -> Examples:
    """The training and held-out examples of ``sources`` for a model of ``context`` tokens.

    ``val_fraction`` of each source is held out by content hash (``pipeline.sft.data.mixture``), of which
    the first ``val_max_per_source`` are scored; conversations longer than the window are cut, or dropped
    with ``drop_truncated``.
    """
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    pad_id = tokenizer.token_to_id(special.pad)
    if pad_id is None:
        raise BadInput(f"{tokenizer_json} has no pad token {special.pad!r} (tokenizer.special_tokens.pad)")
    max_tokens = window(max_tokens, context)
    read = read_sources(sources)
    for name, result in read.items():
        if result.bad:
            print(f"sft: {name}: skipped {sum(result.bad.values())} bad records ({bad_summary(result)})")
    mix = mixture(read, {name: s.weight for name, s in sources.items()}, val_fraction, seed)
    by_source: dict[str, list[Conversation]] = {name: [] for name in read}
    for conversation in mix.train:
        by_source[conversation.source].append(conversation)

    def encode(conversations: dict[str, list[Conversation]], limit: Optional[int] = None) -> tuple[dict, dict]:
        """Per source: the encoded examples (the first ``limit``) and the counts of encode_all."""
        examples, counts = {}, {}
        for name, items in conversations.items():
            encoded, counted = encode_all(items, tokenizer, template, max_tokens, special.bos, special.eos,
                                          drop_truncated)
            examples[name], counts[name] = encoded[:limit], counted
        return examples, counts

    train, train_counts = encode(by_source)
    val, val_counts = encode(mix.val, limit=val_max_per_source)
    val = {name: examples for name, examples in val.items() if examples}
    if not val:
        raise BadInput(f"no held-out conversation is left after encoding (sft.val_fraction={val_fraction}, "
                       f"counts {val_counts}); raise val_fraction")
    if not any(train.values()):
        raise BadInput(f"no training conversation is left after encoding: {train_counts}")
    return Examples(tokenizer, pad_id, max_tokens, read, mix, train, val, {"train": train_counts, "val": val_counts})
