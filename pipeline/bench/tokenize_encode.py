"""Encode throughput of the tokenize stage (datasets.map + shard writing) vs raw `encode_batch`.

Also measured in the same run: raw `encode_batch_fast` (no offsets), which the stage itself calls.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer

from pipeline.config import compose
from pipeline.data.sources import SourceSpec, load_documents
from pipeline.tokenizer.build import SpecialTokens, train_bpe
from pipeline.tokenizer.encode import assign_splits, encode_documents, interleave, train_texts, write_token_shards

GOAL = 0.9  # the stage should keep at least this share of raw tokenizers throughput


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    repeats = 2 if quick else 5
    cfg = compose(*(["~tokenize.sources.novels"] if quick else []), *overrides)
    sources, skipped = {}, []
    for name, spec in cfg.tokenize.sources.items():
        if spec.stage is not None:  # an upstream stage's kept documents, when `make all` has made them
            kept = Path(cfg.paths.outputs_dir) / cfg.name / spec.stage / "kept"
            if not kept.is_dir():
                skipped.append(f"{name} (no {kept}: run 'make {spec.stage}' to include it)")
                continue
            spec = SourceSpec(path=str(kept), format="parquet")
        sources[name] = spec
    for note in skipped:
        print(f"tokenize_encode: skipping source {note}", file=sys.stderr)
    docs = assign_splits(load_documents(sources, cache_dir=str(Path(cfg.paths.cache_dir) / "datasets")),
                         val_fraction=cfg.tokenize.val_fraction, seed=cfg.seed, num_proc=cfg.tokenize.num_proc)
    docs = interleave(docs, cfg.seed)  # both sides encode the documents in the order the stage does
    tokenizer = train_bpe(train_texts(docs), cfg.tokenizer.vocab_size, 2, SpecialTokens().all())
    eos = tokenizer.token_to_id("</s>")
    texts = docs["text"]
    mb = sum(docs["n_bytes"]) / 1e6

    def raw(method: str) -> float:
        # A fresh tokenizer, as the stage's workers have: re-encoding the same text with one object
        # would hit tokenizers' word cache filled by the previous repeat and flatter the baseline.
        fresh = Tokenizer.from_str(tokenizer.to_str())
        fresh.encode_special_tokens = True  # the same encoding the stage does
        encode = getattr(fresh, method)
        started = time.perf_counter()
        for i in range(0, len(texts), cfg.tokenize.batch_size):
            encode(texts[i:i + cfg.tokenize.batch_size], add_special_tokens=False)
        return mb / (time.perf_counter() - started)

    def stage() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            encoded = encode_documents(docs, tokenizer, eos, Path(tmp) / "enc.arrow",
                                       num_proc=cfg.tokenize.num_proc, batch_size=cfg.tokenize.batch_size)
            write_token_shards(encoded, Path(tmp), tokenizer.get_vocab_size(), cfg.tokenize.max_shard_tokens,
                               len(sources))
            return mb / (time.perf_counter() - started)

    Tokenizer.from_str(tokenizer.to_str()).encode_batch_fast(texts[:100])  # start tokenizers' thread pool
    raw_runs, fast_runs, stage_runs = [], [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits all sides alike
        raw_runs.append(raw("encode_batch"))
        fast_runs.append(raw("encode_batch_fast"))
        stage_runs.append(stage())
    baseline, candidate = statistics.median(raw_runs), statistics.median(stage_runs)
    fast = statistics.median(fast_runs)
    return {
        "name": "tokenize_encode",
        "what": "MB/s of UTF-8 text encoded: tokenize stage (datasets.map, num_proc, shards) vs raw encode_batch",
        "corpus": {"documents": len(docs), "mb": round(mb, 2), "sources": list(sources), "skipped": skipped},
        "baseline": {"name": "tokenizers encode_batch, fresh tokenizer, Rust threads", "mb_per_s": round(baseline, 3),
                     "runs": [round(x, 3) for x in raw_runs]},
        # encode_batch_fast skips character offsets; the stage uses it, so it is the tighter bound.
        "raw_encode_batch_fast": {"mb_per_s": round(fast, 3), "runs": [round(x, 3) for x in fast_runs],
                                  "ratio": round(candidate / fast, 3)},
        "note": f"vs raw encode_batch_fast ({fast:.3f} MB/s): ratio {candidate / fast:.3f}",
        "candidate": {"name": f"stage encode (num_proc={cfg.tokenize.num_proc})", "mb_per_s": round(candidate, 3),
                      "runs": [round(x, 3) for x in stage_runs]},
        "overrides": list(overrides),
        "ratio": round(candidate / baseline, 3),
        "goal": GOAL,
        "meets_goal": candidate / baseline >= GOAL,
    }
