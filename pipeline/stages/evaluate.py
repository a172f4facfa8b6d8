"""evaluate: every configured model on every held-out set (perplexity, bits per byte), every prompting task, and
each check turned on: lm-evaluation-harness agreement, TL;DR summarization, the CrowS-Pairs bias probe and a
linear head on the frozen model beside LoRA + head. One report, results.md.

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

from pipeline import PROJECT_ROOT
from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.data.sources import SourceSpec
from pipeline.errors import BadInput
from pipeline.files import file_hash
from pipeline.evaluate.models import load_any, pick_device
from pipeline.evaluate.prompting import prompt_suite
from pipeline.model.io import model_kind
from pipeline.evaluate.report import ALL, Check, evaluate_models, held_out_set
from pipeline.tracking.energy import energy_table, lineage, total

SECTIONS = ("seed", "evaluate", "tokenizer")  # the seed draws the prompting demonstrations; eos prefixes documents


def upstream(cfg: StageConfig) -> list[str]:
    e = cfg.evaluate
    if not e.models:
        raise BadInput("evaluate.models is empty: name a model, e.g. +evaluate.models.base.stage=pretrain")
    if not e.sets:
        raise BadInput("evaluate.sets is empty: name held-out documents, e.g. +evaluate.sets.corpus.stage=tokenize")
    return sorted(({m.stage for m in e.models.values()} | {s.stage for s in e.sets.values()}) - {None})


def fingerprint(cfg: StageConfig) -> dict:
    """The harness's task files (conf/harness/), when it runs: editing one changes what lm-eval asks."""
    if not cfg.evaluate.harness.enabled:
        return {}
    return {str(path): file_hash(path) for path in sorted((PROJECT_ROOT / "conf" / "harness").glob("*.yaml"))}


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


def sst2_task(cfg: StageConfig) -> Optional[str]:
    """The prompting task that reads SST-2 with 0 shots (the task head's table sets its accuracy beside)."""
    return next((name for name, t in cfg.evaluate.tasks.items() if t.reader == "sst2" and 0 in t.shots), None)


def checks(cfg: StageConfig, ctx: StageContext, exports: dict[str, Optional[Path]], device: str) -> list[Check]:
    """The evaluations turned on in evaluate.{harness,summarize,bias,head}; their data is read here, before any
    model is loaded, so a bad file fails at once."""
    e, out = cfg.evaluate, []
    if e.harness.enabled:
        from pipeline.evaluate.harness import harness_check

        out.append(harness_check(e, exports, ctx.build_dir / "harness", device, ctx.cache_dir / "datasets"))
    if e.summarize.enabled:
        from pipeline.evaluate.summarize import baselines, read_peps, summarize, summary_report

        s, eos = e.summarize, cfg.tokenizer.special_tokens.eos  # a summary ends at the end-of-document token
        peps = read_peps(Path(s.path), s.limit, s.seed)
        base = baselines(peps.docs, s.seed)
        out.append(Check("summarize", "zero-shot summarization (TL;DR:)",
                         lambda name, model: summarize(model, peps.docs, s.decodings, s.max_new_tokens,
                                                       source=Path(s.path).name, cpu_threads=s.cpu_threads,
                                                       eos_id=model.tokenizer.token_to_id(eos)),
                         lambda results, _: summary_report(results, base, peps)))
    if e.bias.enabled:
        from pipeline.evaluate.bias import bias_probe, bias_report, read_crows_pairs

        pairs = read_crows_pairs(Path(e.bias.path), e.bias.limit)
        out.append(Check("bias", "bias probe (CrowS-Pairs)",
                         lambda name, model: bias_probe(model, pairs, e.batch_size, device),
                         lambda results, _: bias_report(results)))
    if e.head.enabled:
        from pipeline.evaluate.head import head_report, read_split, train_heads

        for key in ("train_path", "dev_path", "test_path"):  # a bad row fails now, not minutes into a model
            read_split(getattr(e.head, key), key)
        task = sst2_task(cfg)
        out.append(Check("head", "SST-2: prompting, the frozen model with a linear head, LoRA with a head",
                         lambda name, model: train_heads(model, e.head, ctx.cache_dir / "head", device),
                         lambda results, ev: head_report(results, ev.prompt_accuracy(task) if task else {}, e.head,
                                                         e.tasks[task].limit if task else None)))
    return out


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    e, device = cfg.evaluate, pick_device(cfg.evaluate.device)
    sets = {name: held_out_set(name, s, val_documents(name, s, ctx), str(ctx.cache_dir / "datasets"))
            for name, s in e.sets.items()}
    suites = [prompt_suite(name, seed=cfg.seed, **dataclasses.asdict(t)) for name, t in e.tasks.items()]
    models = {}  # loaded one at a time while scoring
    exports = {}  # model -> its transformers directory, where it has one (the harness reads it)
    for name, m in e.models.items():
        path, key = m.located(ctx.input_dirs, f"evaluate.models.{name}")
        exports[name] = next((d for d in (path, path / "hf") if model_kind(d) == "transformers"), None)
        ctx.run.set_tags({f"evaluated.{name}.run_id": ctx.inputs[m.stage].run_id or ""} if m.stage else
                         {f"evaluated.{name}.path": str(path)})
        models[name] = partial(load_any, name, path, e.prefix_token, cfg.tokenizer.special_tokens.eos, device,
                               e.context, key)
    result = evaluate_models(models, sets, suites, e.stride, e.batch_size, device, checks(cfg, ctx, exports, device))

    (ctx.build_dir / "results.json").write_text(json.dumps([r.as_dict() for r in result.rows], indent=1))
    before = lineage({n: u.manifest for n, u in ctx.inputs.items()})  # every stage before this one
    (ctx.build_dir / "results.md").write_text(f"{result.report()}\n## Energy of the pipeline before evaluate\n\n"
                                              f"{energy_table(before)}")
    for name in ("results.md", "results.json"):
        ctx.run.log_artifact(ctx.build_dir / name)
    print(result.summary())
    spent = total([m.get("energy") for m in before])
    measured = {"pipeline/energy_kwh": spent["kwh"], "pipeline/co2_kg": spent["co2_kg"]} if spent["runs"] else {}
    return StageResult(counts={**result.counts(), "pipeline_energy": {**spent, "stages": len(before)}},
                       metrics={**result.metrics(), **measured},
                       outputs={"results": "results.json", "report": "results.md",
                                "table": [r.as_dict() for r in result.rows if r.source == ALL]})
