"""Encode a document Dataset into token shards: split by text hash, tokenize with datasets.map, write shards."""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from pipeline.data.shards import ShardWriter, open_shards, token_dtype
from pipeline.data.sources import SourceSpec, infer_format, load_documents, resolve_files
from pipeline.errors import BadInput, shown_path
from pipeline.tokenizer.build import vocab_bound
from pipeline.tokenizer.spec import EncodeSpec

TRAIN, VAL, EMPTY = 0, 1, -1
# Document length histogram bin edges, in tokens (EOS included); the last bin is open-ended.
LENGTH_BINS = [0] + [2**k for k in range(25)]
SPLITS = {"train": TRAIN, "val": VAL}


class _SplitAssigner:
    """Held-out membership from a hash of the text, so duplicates share a split and reruns agree."""

    def __init__(self, val_fraction: float, seed: int):
        self.threshold = int(val_fraction * 2**64)
        self.key = str(seed).encode()

    def __call__(self, batch: dict) -> dict:
        splits, n_bytes = [], []
        for text in batch["text"]:
            raw = (text or "").encode("utf-8")
            n_bytes.append(len(raw))
            if not raw.strip():
                splits.append(EMPTY)
                continue
            digest = int.from_bytes(hashlib.blake2b(raw, digest_size=8, key=self.key).digest(), "little")
            splits.append(VAL if digest < self.threshold else TRAIN)
        return {"split": np.array(splits, np.int8), "n_bytes": np.array(n_bytes, np.int64)}


def assign_splits(docs: datasets.Dataset, val_fraction: float, seed: int, num_proc: int = 1) -> datasets.Dataset:
    """Add ``split`` (0 train, 1 val, -1 empty document) and ``n_bytes`` (UTF-8 length) columns."""
    assert 0.0 <= val_fraction < 1.0, val_fraction
    return docs.map(_SplitAssigner(val_fraction, seed), batched=True, batch_size=1000, num_proc=_procs(num_proc, docs),
                    desc="Assigning splits")


def interleave(docs: datasets.Dataset, seed: int) -> datasets.Dataset:
    """Documents in a seeded random order.

    datasets.map(num_proc=N) hands each worker a contiguous block; with sources concatenated in
    order, one worker would get all the long documents. Shuffled, the work splits evenly, sources
    mix within shards, and the result does not depend on num_proc.
    """
    return docs.shuffle(seed=seed).flatten_indices()


def _holds_text(files: list[str], fmt: str) -> bool:
    """Whether any of ``files`` has a row (Parquet) or a non-blank character (JSON, text); reads only until it
    finds one, because datasets fails on such files with an error that does not say they are empty."""
    for path in files:
        if fmt == "parquet":
            try:
                if pq.read_metadata(path).num_rows:
                    return True
            except (pa.ArrowException, OSError):
                return True  # unreadable, not empty: datasets names the problem
            continue
        try:
            with fsspec.open(path, "rt", compression="infer", encoding="utf-8", errors="replace") as fh:
                while chunk := fh.read(1 << 16):
                    if not chunk.isspace():
                        return True
        except (OSError, EOFError):
            return True
    return False


def refuse_empty_sources(sources: Mapping[str, SourceSpec], upstream: Mapping[str, tuple[Path, Mapping]],
                         key: str) -> None:
    """Refuse, before datasets reads anything, a source with no documents: an upstream stage whose manifest says
    it kept none, or files without text. ``upstream`` maps a stage to its manifest's path and content; ``key``
    is the config section (``tokenize``) the messages name."""
    for name, spec in sources.items():
        where = f"{key}.sources.{name}"
        if spec.stage is not None:
            path, manifest = upstream[spec.stage]
            counts = manifest.get("counts", {})
            if counts.get("kept") == 0:
                reasons = counts.get("rejected_by_rule") or counts.get("removed_by_level") or {}
                top = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda rn: -rn[1])[:3] if n)
                top = top or ("its own input was empty" if counts.get("input") == 0 else "")
                raise BadInput(f"{where}: the {spec.stage} stage kept 0 of {counts.get('input', '?')} documents"
                               f"{f' ({top})' if top else ''}, so there is nothing to tokenize; see {shown_path(path)}")
            continue
        files = resolve_files(name, spec.path)
        if not _holds_text(files, spec.format or infer_format(name, files)):
            raise BadInput(f"{where}: {spec.path} holds no documents ({len(files)} file(s), all empty)")


def _refuse_blank_sources(docs: datasets.Dataset, sources: Mapping[str, SourceSpec], key: str) -> None:
    """A source whose every document is blank is a mistake (wrong field, wrong files): name it."""
    table = docs.data if docs._indices is None else docs.flatten_indices().data
    source, split = table.column("source").to_numpy(), table.column("split").to_numpy()
    for index, (name, spec) in enumerate(sources.items()):
        mine = source == index
        if not np.any(split[mine] != EMPTY):
            raise BadInput(f"{key}.sources.{name}: all {int(mine.sum())} documents of {spec.path} are blank, "
                           f"so there is nothing to tokenize")


def split_documents(sources: Mapping[str, SourceSpec], val_fraction: float, seed: int, num_proc: int,
                    cache_dir: Path, key: str = "tokenize") -> tuple[datasets.Dataset, int]:
    """The sources' documents with their split, interleaved in a seeded order, and the number of training ones;
    a source whose documents are all blank, a corpus with no training document, or an empty validation split
    where one is asked for, is refused (check for empty files first: refuse_empty_sources)."""
    docs = assign_splits(load_documents(sources, cache_dir=str(cache_dir)), val_fraction=val_fraction, seed=seed,
                         num_proc=num_proc)
    _refuse_blank_sources(docs, sources, key)
    docs = interleave(docs, seed=seed)
    codes = docs.data.column("split").to_numpy()
    n_train, n_val = int(np.count_nonzero(codes == TRAIN)), int(np.count_nonzero(codes == VAL))
    if n_train == 0:
        raise BadInput(f"no non-empty training documents in {len(docs)} documents from {', '.join(sources)}")
    if n_val == 0 and val_fraction > 0:
        raise BadInput(f"the validation split is empty ({n_train} training documents, "
                       f"tokenize.val_fraction={val_fraction}); raise val_fraction or add documents")
    return docs, n_train


def write_val_documents(docs: datasets.Dataset, source_names: list[str], path: Path) -> int:
    """Write the held-out documents' text and source name to Parquet (the evaluate stage scores them); return their count.

    Kept as text because bits per byte compares models whose tokenizers differ.
    """
    assert docs._indices is None, "flatten_indices() first: the Arrow table must be in the dataset's order"
    table = docs.data
    picked = pa.array(np.flatnonzero(table.column("split").to_numpy() == VAL))
    sources = np.asarray(source_names, dtype=object)[table.column("source").take(picked).to_numpy()]
    pq.write_table(pa.table({"text": table.column("text").take(picked), "source": pa.array(sources, pa.string())}), path)
    return len(picked)


def train_texts(docs: datasets.Dataset, batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of training-split texts, for tokenizer training."""
    for batch in docs.select_columns(["text", "split"]).iter(batch_size=batch_size):
        yield [t for t, s in zip(batch["text"], batch["split"]) if s == TRAIN]


class _Encoder:
    """Picklable map function: tokenizes a batch and appends EOS to every document."""

    def __init__(self, tokenizer_json: str, eos_id: int):
        self.tokenizer_json, self.eos_id = tokenizer_json, eos_id
        self._tokenizer = None

    def __getstate__(self):
        return {"tokenizer_json": self.tokenizer_json, "eos_id": self.eos_id, "_tokenizer": None}

    def __call__(self, batch: dict) -> dict:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
            self._tokenizer.encode_special_tokens = True  # "</s>" written in a web page is text, not EOS
        encodings = self._tokenizer.encode_batch_fast([t or "" for t in batch["text"]], add_special_tokens=False)
        return {"ids": [e.ids + [self.eos_id] for e in encodings]}


def _procs(num_proc: int, docs: datasets.Dataset) -> int | None:
    return num_proc if num_proc > 1 and len(docs) >= 2 * num_proc else None


def encode_documents(docs: datasets.Dataset, tokenizer: Tokenizer, eos_id: int, cache_file: Path,
                     num_proc: int = 1, batch_size: int = 1000) -> datasets.Dataset:
    """Add an ``ids`` column (tokens + EOS) and drop ``text``; the Arrow result goes to ``cache_file``."""
    features = docs.features.copy()
    del features["text"]
    features["ids"] = datasets.List(datasets.Value("int32"))
    procs = _procs(num_proc, docs)
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    if procs:
        # Forked workers then encode on one thread each (tokenizers would warn and do so anyway).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return docs.map(_Encoder(tokenizer.to_str(), eos_id), batched=True, batch_size=batch_size, num_proc=procs,
                        remove_columns=["text"], features=features, cache_file_name=str(cache_file),
                        load_from_cache_file=False, desc="Encoding")
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def length_bucket(lengths: np.ndarray) -> np.ndarray:
    """Index of each length's histogram bin: [2^(k-1), 2^k) is bin k; the last bin takes all longer ones."""
    return np.minimum(np.digitize(lengths, LENGTH_BINS[1:]), len(LENGTH_BINS) - 2)


def write_token_shards(encoded: datasets.Dataset, out_dir: Path, vocab_size: int, max_shard_tokens: int,
                       n_sources: int) -> dict:
    """Write train/val shards from an encoded Dataset; return the shard index and per-split counts."""
    dtype = token_dtype(vocab_size)
    writers = {name: ShardWriter(out_dir, name, dtype, max_shard_tokens) for name in SPLITS}
    counts = {name: {"documents": np.zeros(n_sources, np.int64), "tokens": np.zeros(n_sources, np.int64),
                     "bytes": np.zeros(n_sources, np.int64)} for name in [*SPLITS, "empty"]}
    length_counts = np.zeros((n_sources, len(LENGTH_BINS) - 1), np.int64)
    table_iter = encoded.with_format("arrow").iter(batch_size=10_000)
    for table in tqdm(table_iter, total=-(-len(encoded) // 10_000), desc="Writing shards", unit="batch"):
        split = table["split"].to_numpy()
        source = table["source"].to_numpy()
        n_bytes = table["n_bytes"].to_numpy()
        ids = table["ids"].combine_chunks()
        for name, code in [*SPLITS.items(), ("empty", EMPTY)]:
            mask = split == code
            if not mask.any():
                continue
            c = counts[name]
            c["documents"] += np.bincount(source[mask], minlength=n_sources)
            c["bytes"] += np.bincount(source[mask], weights=n_bytes[mask], minlength=n_sources).astype(np.int64)
            if name == "empty":
                continue
            picked = pc.filter(ids, pa.array(mask))
            lengths = pc.list_value_length(picked).to_numpy(zero_copy_only=False).astype(np.int64)
            c["tokens"] += np.bincount(source[mask], weights=lengths, minlength=n_sources).astype(np.int64)
            np.add.at(length_counts, (source[mask], length_bucket(lengths)), 1)
            writers[name].add(picked.flatten().to_numpy(zero_copy_only=False), lengths)
    index = {"dtype": dtype.name, "splits": {name: w.close() for name, w in writers.items()}}
    return {"index": index, "counts": {name: {k: v.tolist() for k, v in c.items()} for name, c in counts.items()},
            "length_histogram": {"bins": LENGTH_BINS, "counts": length_counts.tolist()}}


@dataclass
class TokenShards:
    """Train and val token shards in ``dir`` as ``index`` lists them, and the val split's UTF-8 bytes per token
    (EOS counted: it is predicted like any token, so val loss * tokens / bytes is bits per byte)."""

    dir: Path
    index: dict
    val_bytes_per_token: float

    @classmethod
    def published(cls, directory: Path, manifest: Mapping) -> "TokenShards":
        """The shards a tokenize stage published, from its directory and manifest."""
        return cls(Path(directory), manifest["outputs"]["shards"], manifest["metrics"]["tokenize/val_bytes_per_token"])

    def tokens(self, split: str) -> list[np.ndarray]:
        """The split's shards as memory-mapped token arrays."""
        return [s.tokens for s in open_shards(self.dir, self.index, split)]


@dataclass
class EncodedCorpus:
    shards: TokenShards
    counts: dict  # split (train, val, empty) -> documents, tokens, bytes: one number per source
    length_histogram: dict  # bins and per-source counts of document lengths in tokens
    encode_seconds: float = 0.0  # encoding and writing the shards

    def totals(self) -> dict:
        """``counts`` summed over the sources."""
        return {split: {key: sum(v) for key, v in c.items()} for split, c in self.counts.items()}


def encode_corpus(docs: datasets.Dataset, source_names: list[str], tokenizer: Tokenizer, eos_id: int, out_dir: Path,
                  spec: EncodeSpec) -> EncodedCorpus:
    """The held-out documents as text (val.parquet) and both splits as token shards, into ``out_dir``.

    ``docs`` carries assign_splits' columns; the Arrow file of encoded documents is removed afterwards.
    """
    out_dir = Path(out_dir)
    write_val_documents(docs, source_names, out_dir / "val.parquet")  # text, for the evaluate stage
    started = time.perf_counter()
    scratch = out_dir / "encoded"
    encoded = encode_documents(docs, tokenizer, eos_id, scratch / "data.arrow", num_proc=spec.num_proc,
                               batch_size=spec.batch_size)
    shards = write_token_shards(encoded, out_dir, vocab_bound(tokenizer), spec.max_shard_tokens, len(source_names))
    encoded.cleanup_cache_files()
    del encoded
    shutil.rmtree(scratch, ignore_errors=True)
    val = shards["counts"]["val"]
    return EncodedCorpus(TokenShards(out_dir, shards["index"], sum(val["bytes"]) / max(sum(val["tokens"]), 1)),
                         shards["counts"], shards["length_histogram"], time.perf_counter() - started)


def encode_sources(sources: Mapping[str, SourceSpec], tokenizer: Tokenizer, eos_id: int, out_dir: Path,
                   val_fraction: float, seed: int, spec: EncodeSpec, cache_dir: Path, key: str) -> EncodedCorpus:
    """Read ``sources``, hold out ``val_fraction`` of the documents (by hash of their text) and encode both
    splits into ``out_dir`` (created); ``key`` is the config section named in error messages."""
    if not sources:
        raise BadInput(f"{key}.sources is empty: name a corpus, e.g. +{key}.sources.NAME.path=<file>")
    refuse_empty_sources(sources, {}, key)
    docs = assign_splits(load_documents(dict(sources), cache_dir=str(cache_dir)), val_fraction=val_fraction,
                         seed=seed, num_proc=spec.num_proc)
    _refuse_blank_sources(docs, sources, key)
    Path(out_dir).mkdir()
    corpus = encode_corpus(docs, list(sources), tokenizer, eos_id, out_dir, spec)
    if not corpus.totals()["val"]["tokens"]:
        raise BadInput(f"the validation split of {key}.sources is empty ({len(docs)} documents, {key}.val_fraction="
                       f"{val_fraction}); raise val_fraction or add documents")
    return corpus
