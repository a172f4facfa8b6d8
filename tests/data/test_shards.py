"""Token shards: dtype choice, documents never straddle shards, memory-mapped read back."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.shards import ShardWriter, open_shards, token_dtype


def test_dtype_is_uint16_while_the_vocabulary_fits():
    assert token_dtype(256) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32


@pytest.mark.parametrize("vocab_size", [1000, 100_000])
def test_documents_round_trip_across_shard_rollover(tmp_path, vocab_size):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab_size, rng.integers(1, 40)).astype(np.int64) for _ in range(300)]
    docs.append(rng.integers(0, vocab_size, 250))  # longer than a shard: gets a shard of its own
    dtype = token_dtype(vocab_size)
    writer = ShardWriter(tmp_path, "train", dtype, max_shard_tokens=200)
    for i in range(0, len(docs), 37):  # batches of documents, as the encoder delivers them
        batch = docs[i:i + 37]
        writer.add(np.concatenate(batch), np.array([len(d) for d in batch]))
    index = {"dtype": dtype.name, "splits": {"train": writer.close()}}

    shards = open_shards(tmp_path, index, "train")
    assert len(shards) > 5
    assert all(s.tokens.dtype == dtype for s in shards)
    assert all(len(s.tokens) <= 200 for s in shards if len(s.doc_offsets) > 2), "only a lone long document overflows"
    read = [s.document(i) for s in shards for i in range(len(s.doc_offsets) - 1)]
    assert len(read) == len(docs)
    for a, b in zip(read, docs):
        np.testing.assert_array_equal(a, b)
    assert sum(e["n_tokens"] for e in index["splits"]["train"]) == sum(map(len, docs))


def test_length_buckets_cover_any_document_length():
    from pipeline.tokenizer.encode import LENGTH_BINS, length_bucket

    buckets = length_bucket(np.array([1, 2, 3, 4, 2**24 - 1, 2**24, 2**30]))
    assert buckets.tolist() == [1, 2, 2, 3, 24, 24, 24] and buckets.max() == len(LENGTH_BINS) - 2
