"""cpt: continue pretraining a model on a domain corpus with its own tokenizer; report adaptation and forgetting.

Validation runs on two sets before and after training: the domain's held-out documents ("val") and
the original corpus's validation shards ("val_original", when the tokenizer is the tokenize stage's).
The domain corpus is encoded with the tokenize stage's settings (tokenize.*) and end-of-document token
(tokenizer.special_tokens.eos), so those sections are part of this stage's config.
"""
from __future__ import annotations

import dataclasses
import filecmp

from tokenizers import Tokenizer

from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.model.io import load_pretrained, publish_model
from pipeline.tokenizer.build import token_id
from pipeline.tokenizer.encode import TokenShards, encode_sources
from pipeline.train.run import adaptation, train_model

SECTIONS = ("seed", "tokenize", "tokenizer", "cpt")
RUNTIME = ("trainer",)  # devices, strategy, precision: a killed run may resume on other hardware
RESUMABLE = True


def upstream(cfg: StageConfig) -> list[str]:
    return sorted({cfg.cpt.init.stage, "tokenize"} - {None})


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    spec, special = cfg.cpt, cfg.tokenizer.special_tokens
    init = load_pretrained(*spec.init.located(ctx.input_dirs, "cpt.init"), stage_dirs=ctx.input_dirs)
    tokenizer = Tokenizer.from_file(str(init.tokenizer_json))
    eos_id = token_id(tokenizer, special.eos, init.tokenizer_json, "tokenizer.special_tokens.eos")
    domain = encode_sources(spec.sources, tokenizer, eos_id, ctx.build_dir / "data", spec.val_fraction, cfg.seed,
                            cfg.tokenize, ctx.cache_dir / "datasets", "cpt")

    val, tok = {"val": domain.shards}, ctx.inputs["tokenize"]
    if filecmp.cmp(init.tokenizer_json, tok.dir / tok.manifest["outputs"]["tokenizer"], shallow=False):
        val["original"] = TokenShards.published(tok.dir, tok.manifest)
    else:
        print("cpt: the model's tokenizer is not the tokenize stage's, so forgetting on the original corpus is "
              "not measured")
    trained, outcome = train_model(init.model, domain.shards, val, spec, cfg.trainer, cfg.seed, ctx.checkpoint_dir,
                                   init.tokenizer_json, eos_id, ctx.run, evaluate_first=True)
    if ctx.rank:
        return StageResult()

    outputs = publish_model(trained, init.tokenizer_json, ctx.build_dir,
                            dataclasses.asdict(special) if spec.export else None, ctx.checkpoint_dir)
    outputs.update(data={"dir": "data", "shards": domain.shards.index}, val_documents="data/val.parquet")
    metrics = {**outcome.metrics, **outcome.before, **adaptation(outcome.before, outcome.metrics)}
    counts = {"steps": spec.max_steps, "resumed_from": outcome.resumed_from, "domain": domain.totals()}
    return StageResult(counts=counts, metrics=metrics, outputs=outputs, step=spec.max_steps)
