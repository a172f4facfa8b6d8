"""merge: fold the sft stage's LoRA adapter into its base model (W + alpha/rank * BA becomes one W).

Writes a plain ``model.pt`` with ``tokenizer.json`` (what the evaluate stage and ``make generate``
read) and a transformers directory ``hf/`` whose tokenizer carries the chat template, so
``AutoModelForCausalLM.from_pretrained`` and ``apply_chat_template`` work offline. Both are checked
before they are published: the merged model's logits must equal the adapter model's, and the
transformers model's logits the merged model's.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline.contract import StageContext, StageResult
from pipeline.errors import BadInput
from pipeline.model.gpt import GPT, MODEL_FILE, load_model, save_model
from pipeline.sft.lora import load_adapter, merge

SECTIONS = ("tokenizer",)  # the special tokens written into the transformers tokenizer
TOLERANCE = 1e-4  # largest absolute logit difference accepted between the adapter model and the merged one


def upstream(cfg: DictConfig) -> list[str]:
    return ["sft"] + ([cfg.sft.init.stage] if cfg.sft.init.stage else [])


def base_of(ctx: StageContext) -> GPT:
    """The model the adapter was trained on, refused if its stage was rebuilt since."""
    from pipeline.stages.sft import load_path

    sft = ctx.inputs["sft"]
    base = sft.manifest["outputs"]["base"]
    if base["stage"] is None:
        return load_path(Path(base["path"]))[0]
    trained_on = sft.manifest["inputs"][base["stage"]]["manifest_sha256"]
    if ctx.inputs[base["stage"]].hash != trained_on:
        raise BadInput(f"{base['stage']} was rebuilt after sft trained its adapter on it: run 'make sft' again")
    return load_model(ctx.inputs[base["stage"]].dir)


def probe(model, context: int, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids)[0].float()


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    from pipeline.model.export import export_transformers

    sft = ctx.inputs["sft"]
    outputs = sft.manifest["outputs"]
    if "adapter" not in outputs:  # full fine-tuning: the weights are already one plain model
        merged = load_model(sft.dir / outputs["model"]).eval()
        adapter_diff = 0.0
    else:
        peft_model = load_adapter(base_of(ctx), sft.dir / outputs["adapter"]).eval()
        context, vocab = peft_model.cfg.context, peft_model.cfg.vocab_size
        with_adapter = probe(peft_model, context, vocab)
        merged = merge(peft_model).eval()
        adapter_diff = float((probe(merged, context, vocab) - with_adapter).abs().max())
        if not adapter_diff <= TOLERANCE:
            raise BadInput(f"the merged model's logits differ from the adapter model's by {adapter_diff:.2e} "
                           f"(more than {TOLERANCE}): the merge is wrong, nothing was written")

    out = ctx.build_dir
    save_model(merged, out / MODEL_FILE)
    shutil.copy2(sft.dir / outputs["tokenizer"], out / "tokenizer.json")
    template = (sft.dir / outputs["chat_template"]).read_text()
    (out / "chat_template.jinja").write_text(template)
    special = cfg.tokenizer.special_tokens
    export_transformers(merged, out / "tokenizer.json", out / "hf", bos=special.bos, eos=special.eos,
                        pad=special.pad, chat_template=template)
    hf_diff = transformers_difference(out / "hf", merged)
    if not hf_diff <= TOLERANCE:
        raise BadInput(f"the exported transformers model's logits differ from the merged model's by {hf_diff:.2e}")
    metrics = {"merge/max_logit_diff": adapter_diff, "merge/hf_max_logit_diff": hf_diff,
               "merge/params": sum(p.numel() for p in merged.parameters())}
    return StageResult(metrics=metrics, outputs={"model": MODEL_FILE, "tokenizer": "tokenizer.json", "hf": "hf",
                                                 "chat_template": "chat_template.jinja",
                                                 "template": outputs["template"]})


def transformers_difference(directory: Path, merged: GPT) -> float:
    """Largest logit difference between the directory loaded offline by transformers and ``merged``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    ids = torch.randint(0, merged.cfg.vocab_size, (2, merged.cfg.context), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((hf(ids).logits.float() - merged(ids)[0].float()).abs().max())
