"""dpo: preference tuning of the SFT model with DPO (or IPO) and a fresh LoRA adapter.

Reads ``dpo.sources`` (human preference pairs, pipeline/dpo/pairs.py), holds out a share of each by prompt,
renders every pair with the SFT model's chat template and trains the adapter (pipeline/dpo/train.py). The
reference is the SFT model itself: the same network with the adapter switched off. The held-out pairs are
scored before training (the SFT model) and after (the DPO model), and both models answer a few held-out
prompts greedily, side by side in ``comparison.md``.

Output: ``adapter/``, ``tokenizer.json``, ``chat_template.jinja``, the kept checkpoints, ``comparison.md``;
``outputs.base`` names the SFT output the adapter sits on (merge with ``merge.adapter=dpo`` folds both in).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.dpo.pairs import build_pairs
from pipeline.dpo.report import comparison
from pipeline.dpo.train import DpoLoss, train_dpo
from pipeline.errors import BadInput
from pipeline.model.io import load_pretrained
from pipeline.sft.chat import TEMPLATES
from pipeline.sft.examples import window
from pipeline.sft.train import publish_tuned

SECTIONS = ("seed", "tokenizer", "dpo")  # tokenizer: the special tokens the template writes
RUNTIME = ("trainer",)
RESUMABLE = True


def upstream(cfg: StageConfig) -> list[str]:
    return [cfg.dpo.init.stage] if cfg.dpo.init.stage else []


def template_of(chat_template: str | None, where: Path) -> str:
    """The name of the chat template the SFT model was tuned with (its chat_template.jinja)."""
    name = next((name for name, t in TEMPLATES.items() if t.source == chat_template), None)
    if name is None:
        what = "no chat_template.jinja" if chat_template is None else "a chat template this project does not know"
        raise BadInput(f"dpo.init: {where} has {what}; dpo tunes an instruction-tuned model (the sft stage's "
                       f"output), whose template renders the preference pairs")
    return name


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    d, special = cfg.dpo, cfg.tokenizer.special_tokens
    path, key = d.init.located(ctx.input_dirs, "dpo.init")
    sft = load_pretrained(path, key, stage_dirs=ctx.input_dirs)  # an sft adapter is folded into its base
    template = template_of(sft.chat_template, path)
    tokenizer = Tokenizer.from_file(str(sft.tokenizer_json))
    pad_id = tokenizer.token_to_id(special.pad)
    if pad_id is None:
        raise BadInput(f"{sft.tokenizer_json} has no pad token {special.pad!r} (tokenizer.special_tokens.pad)")
    data = build_pairs(d.sources, tokenizer, template, window(d.max_tokens, sft.model.cfg.context), special.bos,
                       special.eos, cfg.seed, d.val_fraction, d.val_max_per_source)
    tuned = train_dpo(sft.model, data, pad_id, d, DpoLoss(d.beta, d.loss, d.label_smoothing), d.lora, cfg.trainer,
                      cfg.seed, ctx.checkpoint_dir, log=lambda metrics, step: ctx.run.log_metrics(metrics, step=step),
                      write_text=ctx.run.log_text)
    if ctx.rank:
        return StageResult()
    before = tuned.outcome.before or ctx.run.logged_metrics("before")  # resumed: measured by the first execution
    metrics = {**tuned.outcome.metrics, **before, **tuned.metrics, **data.metrics()}
    report = comparison(tuned.model, data, metrics, tokenizer, template, special, d.generate.per_source,
                        d.generate.max_new_tokens)
    (ctx.build_dir / "comparison.md").write_text(report)
    print(report)
    outputs = publish_tuned(tuned.model, d.lora, template, sft.tokenizer_json, ctx.checkpoint_dir, ctx.build_dir)
    ctx.run.log_artifact(ctx.build_dir / "comparison.md")
    ctx.run.client.log_artifacts(ctx.run.run_id, str(ctx.build_dir / outputs["adapter"]), outputs["adapter"])
    if data.bad_examples:
        ctx.run.log_dict(data.bad_examples, "bad_records.json")
    counts = {"steps": d.max_steps, "resumed_from": tuned.outcome.resumed_from, "pairs": data.counts}
    return StageResult(counts=counts, metrics=metrics, step=d.max_steps,
                       outputs={**outputs, "base": {"stage": d.init.stage, "path": str(path)}})
