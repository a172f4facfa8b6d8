"""merge: fold a LoRA adapter into its base model (W + alpha/rank * BA becomes one W).

``merge.adapter`` names the stage: ``sft`` (its adapter on the cpt model), or ``dpo`` (its adapter on the SFT
model, whose own adapter is folded in first).

Writes a plain ``model.pt`` with ``tokenizer.json`` (what the evaluate stage and ``make generate``
read) and a transformers directory ``hf/`` whose tokenizer carries the chat template, so
``AutoModelForCausalLM.from_pretrained`` and ``apply_chat_template`` work offline. Both are checked
before they are published: the merged model's logits must equal the adapter model's, and the
transformers model's logits the merged model's.
"""
from __future__ import annotations

import dataclasses

from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.model.equivalence import check_export, fold_adapter
from pipeline.model.io import load_pretrained, publish_model

# tokenizer: the special tokens written into the transformers tokenizer; sft.init, dpo.init: the bases
SECTIONS = ("tokenizer", "sft", "dpo", "merge")
TOLERANCE = 1e-4  # largest absolute logit difference accepted between the adapter model and the merged one


def upstream(cfg: StageConfig) -> list[str]:
    adapter = cfg.merge.adapter.value
    init = getattr(cfg, adapter).init.stage
    return [adapter] + ([init] if init else [])


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    adapter = cfg.merge.adapter.value
    stage = ctx.inputs[adapter]  # load_pretrained refuses an adapter whose base stage was rebuilt since
    tuned = load_pretrained(stage.dir, f"the {adapter} stage's output", stage_dirs=ctx.input_dirs, keep_adapter=True)
    merged, adapter_diff = fold_adapter(tuned.model, TOLERANCE)
    outputs = publish_model(merged, tuned.tokenizer_json, ctx.build_dir, dataclasses.asdict(cfg.tokenizer.special_tokens),
                            chat_template=tuned.chat_template)
    hf_diff = check_export(ctx.build_dir / "hf", merged, TOLERANCE)
    metrics = {"merge/max_logit_diff": adapter_diff, "merge/hf_max_logit_diff": hf_diff,
               "merge/params": sum(p.numel() for p in merged.parameters())}
    return StageResult(metrics=metrics, outputs={**outputs, "template": stage.manifest["outputs"]["template"]})
