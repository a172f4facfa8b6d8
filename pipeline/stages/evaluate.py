"""evaluate: perplexity and bits per byte of every configured model on every held-out set, in one table.

Models are training stages' outputs or transformers directories; sets are a stage's held-out
documents (tokenize: the pretraining corpus, cpt: the domain corpus) or files read like
tokenize.sources. Each model scores the text with its own tokenizer, so bits per byte compare.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from pipeline.config import EvalModel, EvaluateConfig, PromptTaskConfig, typed
from pipeline.contract import StageContext, StageResult
from pipeline.data.sources import SourceSpec, load_source
from pipeline.errors import BadInput
from pipeline.evaluate.models import load_any, pick_device, pipeline_model
from pipeline.evaluate.prompting import PromptTask, evaluate_task, read_examples
from pipeline.evaluate.report import (ALL, HeldOut, evaluate_model, matrix, metrics_of, prompting_report, read_held_out,
                                      table)

SECTIONS = ("seed", "evaluate")  # the seed draws the prompting demonstrations


def _models(cfg: DictConfig) -> dict[str, EvalModel]:
    models = {name: typed(node, EvalModel, f"evaluate.models.{name}") for name, node in cfg.evaluate.models.items()}
    if not models:
        raise BadInput("evaluate.models is empty: name a model, e.g. +evaluate.models.base.stage=pretrain")
    for name, m in models.items():
        if (m.stage is None) == (m.path is None):
            raise BadInput(f"evaluate.models.{name}: set 'stage' or 'path', not {'both' if m.stage else 'neither'}")
    return models


def _sets(cfg: DictConfig) -> dict[str, SourceSpec]:
    sets = {name: typed(node, SourceSpec, f"evaluate.sets.{name}") for name, node in cfg.evaluate.sets.items()}
    if not sets:
        raise BadInput("evaluate.sets is empty: name held-out documents, e.g. +evaluate.sets.corpus.stage=tokenize")
    return sets


def upstream(cfg: DictConfig) -> list[str]:
    stages = {m.stage for m in _models(cfg).values()} | {s.stage for s in _sets(cfg).values()}
    return sorted(stages - {None})


def held_out(name: str, spec: SourceSpec, ctx: StageContext) -> HeldOut:
    if spec.stage is None:
        docs = load_source(name, spec, cache_dir=str(ctx.cache_dir / "datasets"))
        texts = [t for t in docs["text"] if t and t.strip()]
        return HeldOut(texts, [name] * len(texts))
    up = ctx.inputs[spec.stage]
    relative = up.manifest["outputs"].get("val_documents")
    if relative is None:
        raise BadInput(f"evaluate.sets.{name}: {up.dir} has no held-out documents; rebuild it with "
                       f"'make -B {spec.stage}' (older outputs did not keep them)")
    return read_held_out(up.dir / relative, spec.max_documents)


def prompting_tasks(cfg: DictConfig) -> dict[str, tuple[PromptTaskConfig, list, Optional[list]]]:
    """name -> (its config, the examples scored, the demonstrations' pool or None)."""
    tasks = {}
    for name, node in cfg.evaluate.tasks.items():
        t = typed(node, PromptTaskConfig, f"evaluate.tasks.{name}")
        examples = read_examples(t.reader, Path(t.path), t.labels_path and Path(t.labels_path))
        train = read_examples(t.reader, Path(t.train_path), None) if t.train_path else None
        PromptTask(**_task_args(name, t, max(t.shots), cfg.seed))  # a bad template or answer map fails before scoring
        tasks[name] = (t, examples, train)
    return tasks


def _task_args(name: str, t: PromptTaskConfig, shots: int, seed: int) -> dict:
    return dict(name=name, template=t.template, labels=list(t.labels), answers=dict(t.answers) if t.answers else None,
                answer_template=t.answer_template, shots=shots, separator=t.separator,
                length_normalize=t.length_normalize, seed=seed)


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    spec = typed(cfg.evaluate, EvaluateConfig, "evaluate")
    device = pick_device(spec.device)
    sets = {name: held_out(name, s, ctx) for name, s in _sets(cfg).items()}
    for name, held in sets.items():
        if not held.texts:
            raise BadInput(f"evaluate.sets.{name} holds no non-empty documents")

    tasks = prompting_tasks(cfg)
    rows, params, results = [], {}, []
    for name, m in _models(cfg).items():
        if m.stage:
            model = pipeline_model(name, ctx.inputs[m.stage].dir, spec.prefix_token or cfg.tokenizer.special_tokens.eos,
                                   device)
            ctx.run.set_tags({f"evaluated.{name}.run_id": ctx.inputs[m.stage].run_id or ""})
        else:
            model = load_any(name, Path(m.path), spec.prefix_token, cfg.tokenizer.special_tokens.eos, device,
                             spec.context)
            ctx.run.set_tags({f"evaluated.{name}.path": str(Path(m.path).resolve())})
        params[name] = model.parameters
        rows += evaluate_model(model, sets, spec.stride, spec.batch_size, device)
        for task_name, (t, examples, train) in tasks.items():
            for shots in t.shots:
                task = PromptTask(**_task_args(task_name, t, shots, cfg.seed))
                results.append((name, evaluate_task(model, task, examples, train, t.limit, spec.batch_size, device)))
        del model

    (ctx.build_dir / "results.json").write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    report = f"## bits per byte (perplexity)\n\n{matrix(rows)}\n\n## all measures\n\n{table(rows)}\n"
    metrics = metrics_of(rows)
    if results:
        summary, details, prompt_metrics = prompting_report(results)
        report += f"\n## prompting accuracy\n\n{summary}\n\n{details}"
        metrics.update(prompt_metrics)
        print(f"evaluate: prompting accuracy\n\n{summary}\n")
    (ctx.build_dir / "results.md").write_text(report)
    ctx.run.log_artifact(ctx.build_dir / "results.md")
    ctx.run.log_artifact(ctx.build_dir / "results.json")
    print(f"\nevaluate: bits per byte (perplexity per token), lower is better; each model reads the text with its "
          f"own tokenizer, so compare bits per byte across tokenizers\n\n{matrix(rows)}\n")
    counts = {"documents": {n: len(h.texts) for n, h in sets.items()}, "parameters": params}
    counts["prompting"] = {f"{m}/{r.name}/{r.shots}shot": r.n for m, r in results}
    return StageResult(counts=counts, metrics=metrics,
                       outputs={"results": "results.json", "report": "results.md",
                                "table": [r.as_dict() for r in rows if r.source == ALL]})
