"""pretrain: train the model of conf/model/ on the tokenize stage's shards; resumable after a kill."""
from __future__ import annotations

import dataclasses

from tokenizers import Tokenizer

from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.model.io import publish_model
from pipeline.tokenizer.build import vocab_bound
from pipeline.tokenizer.encode import TokenShards
from pipeline.train.run import train_model

SECTIONS = ("seed", "model", "pretrain")
RUNTIME = ("trainer",)  # devices, strategy, precision: a killed run may resume on other hardware
RESUMABLE = True


def upstream(cfg: StageConfig) -> list[str]:
    return ["tokenize"]


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    spec, tok = cfg.pretrain, ctx.inputs["tokenize"]
    tokenizer_json = tok.dir / tok.manifest["outputs"]["tokenizer"]
    model = dataclasses.replace(cfg.model, vocab_size=vocab_bound(Tokenizer.from_file(str(tokenizer_json))))
    corpus = TokenShards.published(tok.dir, tok.manifest)
    trained, outcome = train_model(model, corpus, {"val": corpus}, spec, cfg.trainer, cfg.seed, ctx.checkpoint_dir,
                                   tokenizer_json, tok.manifest["outputs"]["eos_id"], ctx.run)
    if ctx.rank:
        return StageResult()
    special = tok.manifest["outputs"]["special_tokens"] if spec.export else None
    outputs = publish_model(trained, tokenizer_json, ctx.build_dir, special, ctx.checkpoint_dir)
    return StageResult(counts={"steps": spec.max_steps, "resumed_from": outcome.resumed_from},
                       metrics=outcome.metrics, outputs=outputs, step=spec.max_steps)
