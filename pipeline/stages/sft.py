"""sft: supervised fine-tuning on instruction data, with LoRA adapters (peft) or every weight.

Reads ``sft.sources``, holds out a share of each and mixes the rest by weight, writes every
conversation with the chat template (pipeline/sft/examples.py), trains on the assistant's replies
only (pipeline/sft/train.py), then compares the base and the fine-tuned model on the held-out part:
loss per source, and replies to held-out instructions side by side (pipeline/sft/report.py).

Output: ``adapter/`` (``model.pt`` for full fine-tuning), ``tokenizer.json``, ``chat_template.jinja``,
the kept checkpoints, ``comparison.md``, ``generations.md``; ``outputs.base`` names the model tuned,
which merge folds the adapter into.
"""
from __future__ import annotations

from dataclasses import asdict

from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.model.io import Pretrained, load_pretrained
from pipeline.sft.examples import build_examples
from pipeline.sft.lora import chat_lora
from pipeline.sft.report import base_vs_tuned
from pipeline.sft.train import fine_tune, publish_tuned

SECTIONS = ("seed", "tokenizer", "sft")  # tokenizer: the special tokens the template writes
RUNTIME = ("trainer",)  # devices, strategy, precision: a killed run may resume on other hardware
RESUMABLE = True


def upstream(cfg: StageConfig) -> list[str]:
    return [cfg.sft.init.stage] if cfg.sft.init.stage else []


def base_model(cfg: StageConfig, ctx: StageContext) -> tuple[Pretrained, dict]:
    """The model to tune, and where it is as ``outputs.base`` records it (merge and load_pretrained read it)."""
    path, key = cfg.sft.init.located(ctx.input_dirs, "sft.init")
    return load_pretrained(path, key, stage_dirs=ctx.input_dirs), {"stage": cfg.sft.init.stage, "path": str(path)}


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    s, special = cfg.sft, cfg.tokenizer.special_tokens
    base, where = base_model(cfg, ctx)
    data = build_examples(s.sources, base.tokenizer_json, base.model.cfg.context, special, cfg.seed,
                          template=s.template, max_tokens=s.max_tokens, val_fraction=s.val_fraction,
                          val_max_per_source=s.val_max_per_source, drop_truncated=s.drop_truncated)
    lora = chat_lora(s.lora, s.template, data.tokenizer, s.lora.chat_tokens) if s.lora.enabled else None
    tuned = fine_tune(base.model, data, s, lora, cfg.trainer, cfg.seed, ctx.checkpoint_dir, packing=s.packing,
                      log=lambda metrics, step: ctx.run.log_metrics(metrics, step=step), write_text=ctx.run.log_text)
    if ctx.rank:
        return StageResult()
    before = tuned.outcome.before or ctx.run.logged_metrics("before")  # resumed: measured by the first execution
    untuned = None if lora else base_model(cfg, ctx)[0].model  # LoRA: the tuned model with its adapter switched off
    report = base_vs_tuned(tuned.model, untuned, data, {**tuned.outcome.metrics, **before}, s.template, special,
                           ctx.build_dir, **asdict(s.generate))  # per_source, max_new_tokens, show
    print(report.comparison)
    outputs = publish_tuned(tuned.model, lora, s.template, base.tokenizer_json, ctx.checkpoint_dir, ctx.build_dir)
    for path in report.files:
        ctx.run.log_artifact(path)
    if report.table:
        ctx.run.client.log_table(ctx.run.run_id, data=report.table, artifact_file="generations.json")
    if lora:
        ctx.run.client.log_artifacts(ctx.run.run_id, str(ctx.build_dir / outputs["adapter"]), outputs["adapter"])
    if data.bad_records():
        ctx.run.log_dict(data.bad_records(), "bad_records.json")
    metrics = {**tuned.outcome.metrics, **before, **report.metrics, **tuned.metrics, **data.metrics()}
    counts = {"steps": s.max_steps, "resumed_from": tuned.outcome.resumed_from, **data.counts()}
    return StageResult(counts=counts, metrics=metrics, outputs={**outputs, "base": where}, step=s.max_steps)
