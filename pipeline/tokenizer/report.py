"""What the tokenize stage reports: metrics, the manifest's counts and outputs, and the corpus plot."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer

from pipeline.tokenizer.build import SpecialTokens
from pipeline.tokenizer.encode import EncodedCorpus
from pipeline.tokenizer.plots import plot_corpus


def per_source(corpus: EncodedCorpus, names: list[str]) -> dict:
    """source -> split -> documents, tokens, bytes."""
    return {name: {split: {key: c[key][i] for key in c} for split, c in corpus.counts.items()}
            for i, name in enumerate(names)}


def tokenize_metrics(corpus: EncodedCorpus, tokenizer: Tokenizer, tokenizer_s: float,
                     requested_vocab_size: Optional[int] = None) -> dict:
    """``requested_vocab_size``: what tokenizer.vocab_size asked of BPE (logged beside the size it got), or None."""
    totals, encode_s = corpus.totals(), corpus.encode_seconds
    total_bytes = totals["train"]["bytes"] + totals["val"]["bytes"]
    requested = {} if requested_vocab_size is None else {"tokenize/vocab_size_requested": requested_vocab_size}
    return {
        "tokenize/vocab_size": tokenizer.get_vocab_size(),
        **requested,
        "tokenize/train_tokens": totals["train"]["tokens"],
        "tokenize/val_tokens": totals["val"]["tokens"],
        "tokenize/train_documents": totals["train"]["documents"],
        "tokenize/val_documents": totals["val"]["documents"],
        "tokenize/empty_documents": totals["empty"]["documents"],
        # EOS counts as a token: it is predicted like any other, so val loss * tokens / bytes is bits per byte.
        "tokenize/val_bytes_per_token": corpus.shards.val_bytes_per_token,
        "tokenize/encode_mb_per_s": total_bytes / 1e6 / max(encode_s, 1e-9),
        "tokenize/encode_seconds": encode_s,
        "tokenize/tokenizer_seconds": tokenizer_s,
    }


def tokenize_counts(corpus: EncodedCorpus, names: list[str], documents_in: int, tokenizer: Tokenizer,
                    requested_vocab_size: Optional[int] = None) -> dict:
    """Documents and tokens per split and source; the vocabulary asked for and got."""
    return {"documents_in": documents_in, **corpus.totals(), "per_source": per_source(corpus, names),
            "vocab_size": {"requested": requested_vocab_size, "actual": tokenizer.get_vocab_size()}}


def tokenize_outputs(corpus: EncodedCorpus, tokenizer: Tokenizer, eos_id: int, special: SpecialTokens) -> dict:
    return {"tokenizer": "tokenizer.json", "vocab_size": tokenizer.get_vocab_size(), "eos_id": eos_id,
            "special_tokens": asdict(special), "shards": corpus.shards.index, "plot": "corpus.png",
            "length_histogram": corpus.length_histogram, "val_documents": "val.parquet"}


def plot_tokenized(corpus: EncodedCorpus, names: list[str], out_dir: Path) -> Path:
    """corpus.png: document lengths and bytes per token, per source."""
    bytes_per_token = [(s["train"]["bytes"] + s["val"]["bytes"]) / max(s["train"]["tokens"] + s["val"]["tokens"], 1)
                       for s in per_source(corpus, names).values()]
    hist = corpus.length_histogram
    return plot_corpus(hist["bins"], hist["counts"], names, bytes_per_token, Path(out_dir) / "corpus.png")
