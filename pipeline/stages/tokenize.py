"""tokenize: train (or load) a tokenizer, then encode the corpus into memory-mappable token shards."""
from __future__ import annotations

import time

from pipeline.contract import MANIFEST, StageConfig, StageContext, StageResult
from pipeline.data.sources import with_stage_paths
from pipeline.tokenizer.build import build_tokenizer, requested_vocab_size, token_id, vocab_shortfall
from pipeline.tokenizer.encode import encode_corpus, refuse_empty_sources, split_documents, train_texts
from pipeline.tokenizer.report import plot_tokenized, tokenize_counts, tokenize_metrics, tokenize_outputs

SECTIONS = ("seed", "tokenize", "tokenizer")


def upstream(cfg: StageConfig) -> list[str]:
    return sorted({s.stage for s in cfg.tokenize.sources.values() if s.stage})


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    t, spec = cfg.tokenize, cfg.tokenizer
    # An upstream stage that kept nothing, or files without text, fail here in one line, not inside datasets.
    refuse_empty_sources(t.sources, {n: (u.dir / MANIFEST, u.manifest) for n, u in ctx.inputs.items()}, "tokenize")
    sources = with_stage_paths(t.sources, ctx.input_dirs)
    docs, n_train = split_documents(sources, t.val_fraction, cfg.seed, t.num_proc, ctx.cache_dir / "datasets")

    started = time.perf_counter()
    tokenizer = build_tokenizer(spec, train_texts(docs), length=n_train)
    tokenizer_s = time.perf_counter() - started
    tokenizer.save(str(ctx.build_dir / "tokenizer.json"))
    eos_id = token_id(tokenizer, spec.special_tokens.eos, "the tokenizer", "tokenizer.special_tokens.eos")

    corpus = encode_corpus(docs, list(sources), tokenizer, eos_id, ctx.build_dir, t)

    ctx.run.log_artifact(plot_tokenized(corpus, list(sources), ctx.build_dir))
    requested = requested_vocab_size(spec)
    shortfall = vocab_shortfall(spec, tokenizer)
    return StageResult(counts=tokenize_counts(corpus, list(sources), len(docs), tokenizer, requested),
                       metrics=tokenize_metrics(corpus, tokenizer, tokenizer_s, requested),
                       outputs=tokenize_outputs(corpus, tokenizer, eos_id, spec.special_tokens),
                       warnings=[shortfall] if shortfall else [])
