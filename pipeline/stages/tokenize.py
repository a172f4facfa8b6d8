"""tokenize: train (or load) a tokenizer, then encode the corpus into memory-mappable token shards."""
from __future__ import annotations

import dataclasses
import shutil
import time

import numpy as np
from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.data.sources import SourceSpec, load_documents
from pipeline.errors import BadInput
from pipeline.tokenizer.build import TokenizerSpec, build_tokenizer
from pipeline.tokenizer.plots import plot_corpus
from pipeline.tokenizer.encode import (TRAIN, VAL, assign_splits, encode_documents, interleave, train_texts,
                                       write_token_shards, write_val_documents)

SECTIONS = ("seed", "tokenize", "tokenizer")


def upstream(cfg: StageConfig) -> list[str]:
    return sorted({s.stage for s in cfg.tokenize.sources.values() if s.stage})


def _sources(cfg: StageConfig, ctx: StageContext) -> dict[str, SourceSpec]:
    """Sources as plain specs, with an upstream stage replaced by the path of its kept documents."""
    specs = {}
    for name, spec in cfg.tokenize.sources.items():
        if spec.stage is not None:
            spec = dataclasses.replace(spec, path=str(ctx.inputs[spec.stage].dir / "kept"), stage=None, format="parquet")
        specs[name] = spec
    return specs


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    t = cfg.tokenize
    spec: TokenizerSpec = cfg.tokenizer
    sources = _sources(cfg, ctx)
    docs = assign_splits(load_documents(sources, cache_dir=str(ctx.cache_dir / "datasets")),
                         val_fraction=t.val_fraction, seed=cfg.seed, num_proc=t.num_proc)
    docs = interleave(docs, seed=cfg.seed)

    split_codes = docs.data.column("split").to_numpy()
    n_train, n_val = int(np.count_nonzero(split_codes == TRAIN)), int(np.count_nonzero(split_codes == VAL))
    if n_train == 0:
        raise BadInput(f"no non-empty training documents in {len(docs)} documents from {', '.join(sources)}")
    if n_val == 0 and t.val_fraction > 0:
        raise BadInput(f"the validation split is empty ({n_train} training documents, "
                       f"tokenize.val_fraction={t.val_fraction}); raise val_fraction or add documents")

    write_val_documents(docs, list(sources), ctx.build_dir / "val.parquet")  # text, for the evaluate stage
    started = time.perf_counter()
    tokenizer = build_tokenizer(spec, train_texts(docs), length=n_train)
    tokenizer_s = time.perf_counter() - started
    tokenizer.save(str(ctx.build_dir / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(spec.special_tokens.eos)

    started = time.perf_counter()
    encoded = encode_documents(docs, tokenizer, eos_id, ctx.build_dir / "encoded" / "data.arrow",
                               num_proc=t.num_proc, batch_size=t.batch_size)
    id_bound = max(tokenizer.get_vocab().values()) + 1  # a given tokenizer.json may leave gaps in its ids
    shards = write_token_shards(encoded, ctx.build_dir, id_bound, t.max_shard_tokens, len(sources))
    encode_s = time.perf_counter() - started
    encoded.cleanup_cache_files()
    del encoded
    shutil.rmtree(ctx.build_dir / "encoded", ignore_errors=True)

    counts = {name: {key: sum(v) for key, v in c.items()} for name, c in shards["counts"].items()}
    per_source = {name: {split: {key: c[key][i] for key in c} for split, c in shards["counts"].items()}
                  for i, name in enumerate(sources)}
    total_bytes = counts["train"]["bytes"] + counts["val"]["bytes"]
    names = list(sources)
    bytes_per_token = [(s["train"]["bytes"] + s["val"]["bytes"]) / max(s["train"]["tokens"] + s["val"]["tokens"], 1)
                       for s in per_source.values()]
    hist = shards["length_histogram"]
    ctx.run.log_artifact(plot_corpus(hist["bins"], hist["counts"], names, bytes_per_token,
                                     ctx.build_dir / "corpus.png"))
    metrics = {
        "tokenize/vocab_size": tokenizer.get_vocab_size(),
        "tokenize/train_tokens": counts["train"]["tokens"],
        "tokenize/val_tokens": counts["val"]["tokens"],
        "tokenize/train_documents": counts["train"]["documents"],
        "tokenize/val_documents": counts["val"]["documents"],
        "tokenize/empty_documents": counts["empty"]["documents"],
        # EOS counts as a token: it is predicted like any other, so val loss * tokens / bytes is bits per byte.
        "tokenize/val_bytes_per_token": counts["val"]["bytes"] / max(counts["val"]["tokens"], 1),
        "tokenize/encode_mb_per_s": total_bytes / 1e6 / max(encode_s, 1e-9),
        "tokenize/encode_seconds": encode_s,
        "tokenize/tokenizer_seconds": tokenizer_s,
    }
    outputs = {"tokenizer": "tokenizer.json", "vocab_size": tokenizer.get_vocab_size(), "eos_id": eos_id,
               "special_tokens": dataclasses.asdict(spec.special_tokens), "shards": shards["index"],
               "plot": "corpus.png", "length_histogram": hist, "val_documents": "val.parquet"}
    return StageResult(counts={"documents_in": len(docs), **counts, "per_source": per_source},
                       metrics=metrics, outputs=outputs)

