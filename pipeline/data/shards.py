"""Token shards: flat little-endian token files that np.memmap reads, plus document offsets.

Layout in a stage directory, per split (train, val):
    <split>-00000.bin        tokens, uint16 when the vocabulary fits, else uint32; EOS ends each document
    <split>-00000.docs.npy   int64 offsets of document starts, with the shard length appended
Documents never straddle shards. The manifest's ``outputs.shards`` lists the files and counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends whole documents to ``<split>-NNNNN.bin`` files, starting a new one past ``max_shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, max_shard_tokens: int):
        assert max_shard_tokens > 0, max_shard_tokens
        self.out_dir, self.split, self.dtype, self.max_shard_tokens = Path(out_dir), split, dtype, max_shard_tokens
        self.shards: list[dict] = []
        self._fh = None
        self._lengths: list[np.ndarray] = []
        self._tokens = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self._fh = open(self.out_dir / f"{name}.bin", "wb")
        self.shards.append({"tokens": f"{name}.bin", "docs": f"{name}.docs.npy", "n_tokens": 0, "n_documents": 0})

    def _close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        np.save(self.out_dir / self.shards[-1]["docs"], offsets)
        self.shards[-1].update(n_tokens=int(offsets[-1]), n_documents=len(lengths))
        self._fh, self._lengths, self._tokens = None, [], 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Write documents given as their concatenated tokens and per-document lengths."""
        assert int(lengths.sum()) == len(tokens), (int(lengths.sum()), len(tokens))
        assert not len(tokens) or int(tokens.max()) <= np.iinfo(self.dtype).max, \
            f"token id {int(tokens.max())} does not fit {self.dtype.name}"
        start_doc, start_tok = 0, 0
        ends = np.cumsum(lengths, dtype=np.int64)
        while start_doc < len(lengths):
            if self._fh is None:
                self._open()
            room = self.max_shard_tokens - self._tokens
            # documents [start_doc, stop) fit in this shard; an empty shard takes at least one document
            stop = int(np.searchsorted(ends, start_tok + room, side="right"))
            if stop == start_doc and self._tokens == 0:
                stop = start_doc + 1
            if stop == start_doc:
                self._close()
                continue
            stop_tok = int(ends[stop - 1])
            self._fh.write(tokens[start_tok:stop_tok].astype(self.dtype, copy=False).tobytes())
            self._lengths.append(lengths[start_doc:stop].astype(np.int64))
            self._tokens += stop_tok - start_tok
            start_doc, start_tok = stop, stop_tok
            if self._tokens >= self.max_shard_tokens:
                self._close()

    def close(self) -> list[dict]:
        self._close()
        return self.shards


@dataclass
class TokenShard:
    tokens: np.ndarray  # memory-mapped
    doc_offsets: np.ndarray

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]


def open_shards(stage_dir: Path, shard_index: dict, split: str) -> list[TokenShard]:
    """Memory-map the shards of ``split`` listed in a tokenize manifest's ``outputs.shards``."""
    dtype = np.dtype(shard_index["dtype"])
    shards = []
    for entry in shard_index["splits"][split]:
        path = Path(stage_dir) / entry["tokens"]
        tokens = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
        shards.append(TokenShard(tokens, np.load(Path(stage_dir) / entry["docs"])))
    return shards
