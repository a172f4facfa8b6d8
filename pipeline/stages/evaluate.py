"""evaluate: perplexity and bits per byte of every configured model on every held-out set, in one table.

Models are training stages' outputs or transformers directories; sets are a stage's held-out
documents (tokenize: the pretraining corpus, cpt: the domain corpus) or files read like
tokenize.sources. Each model scores the text with its own tokenizer, so bits per byte compare.
"""
from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Optional

from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.data.sources import SourceSpec
from pipeline.errors import BadInput
from pipeline.evaluate.models import load_any, pick_device
from pipeline.evaluate.prompting import prompt_suite
from pipeline.evaluate.report import ALL, evaluate_models, held_out_set

SECTIONS = ("seed", "evaluate", "tokenizer")  # the seed draws the prompting demonstrations; eos prefixes documents


def upstream(cfg: StageConfig) -> list[str]:
    e = cfg.evaluate
    if not e.models:
        raise BadInput("evaluate.models is empty: name a model, e.g. +evaluate.models.base.stage=pretrain")
    if not e.sets:
        raise BadInput("evaluate.sets is empty: name held-out documents, e.g. +evaluate.sets.corpus.stage=tokenize")
    return sorted(({m.stage for m in e.models.values()} | {s.stage for s in e.sets.values()}) - {None})


def val_documents(name: str, spec: SourceSpec, ctx: StageContext) -> Optional[Path]:
    """The held-out documents of the stage a set names (None for a set of files)."""
    if spec.stage is None:
        return None
    up = ctx.inputs[spec.stage]
    relative = up.manifest["outputs"].get("val_documents")
    if relative is None:
        raise BadInput(f"evaluate.sets.{name}: {up.dir} has no held-out documents; rebuild it with "
                       f"'make -B {spec.stage}' (older outputs did not keep them)")
    return up.dir / relative


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    e, device = cfg.evaluate, pick_device(cfg.evaluate.device)
    sets = {name: held_out_set(name, s, val_documents(name, s, ctx), str(ctx.cache_dir / "datasets"))
            for name, s in e.sets.items()}
    suites = [prompt_suite(name, seed=cfg.seed, **dataclasses.asdict(t)) for name, t in e.tasks.items()]
    models = {}  # loaded one at a time while scoring
    for name, m in e.models.items():
        path, key = m.located(ctx.input_dirs, f"evaluate.models.{name}")
        ctx.run.set_tags({f"evaluated.{name}.run_id": ctx.inputs[m.stage].run_id or ""} if m.stage else
                         {f"evaluated.{name}.path": str(path)})
        models[name] = partial(load_any, name, path, e.prefix_token, cfg.tokenizer.special_tokens.eos, device,
                               e.context, key)
    result = evaluate_models(models, sets, suites, e.stride, e.batch_size, device)

    (ctx.build_dir / "results.json").write_text(json.dumps([r.as_dict() for r in result.rows], indent=1))
    (ctx.build_dir / "results.md").write_text(result.report())
    for name in ("results.md", "results.json"):
        ctx.run.log_artifact(ctx.build_dir / name)
    print(result.summary())
    return StageResult(counts=result.counts(), metrics=result.metrics(),
                       outputs={"results": "results.json", "report": "results.md",
                                "table": [r.as_dict() for r in result.rows if r.source == ALL]})
