"""sft: supervised fine-tuning on instruction data, with LoRA adapters (peft) or every weight.

Reads the instruction sources of ``sft.sources`` (pipeline/sft/data.py), holds out a share of each,
mixes the rest by weight, writes every conversation with the chat template and trains on the
assistant's replies only (pipeline/sft/chat.py). Before and after training it scores the held-out
conversations (loss per trained token, per source) and answers held-out instructions with the base
and the fine-tuned model (exact match, ROUGE-L), side by side in ``generations.md``.

Output: ``adapter/`` (peft's save_pretrained; ``model.pt`` instead for full fine-tuning),
``tokenizer.json``, ``chat_template.jinja``, the kept checkpoints. The merge stage folds the adapter
into the base model.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from omegaconf import DictConfig
from tokenizers import Tokenizer

from pipeline.config import SftConfig, SftSource, typed
from pipeline.contract import StageContext, StageResult
from pipeline.errors import BadInput
from pipeline.model.gpt import GPT, MODEL_FILE, load_model, save_model
from pipeline.sft.batching import packing_stats
from pipeline.sft.chat import encode_all, get_template
from pipeline.sft.data import Conversation, ReadResult, mixture, read_source
from pipeline.sft.generation import compare, generate_replies, markdown_table, summary
from pipeline.sft.lora import LoraSpec, add_lora, save_adapter, trainable_fraction
from pipeline.sft.train import SFTData, SFTModule
from pipeline.stages.cpt import before_metrics
from pipeline.train.run import TrainerSpec, fit

SECTIONS = ("seed", "tokenizer", "sft")  # tokenizer: the special tokens the template writes
RESUMABLE = True
ADAPTER = "adapter"


def upstream(cfg: DictConfig) -> list[str]:
    init = cfg.sft.init
    if (init.stage is None) == (init.path is None):
        raise BadInput(f"sft.init: set 'stage' or 'path', not {'both' if init.stage else 'neither'}")
    return [init.stage] if init.stage else []


def base_model(cfg: DictConfig, ctx: Optional[StageContext]) -> tuple[GPT, Path, dict]:
    """The model to fine-tune, its tokenizer.json, and where it came from (for the manifest and merge)."""
    init = cfg.sft.init
    if init.stage:
        directory = ctx.inputs[init.stage].dir
        return load_model(directory), directory / "tokenizer.json", {"stage": init.stage, "path": str(directory)}
    return load_path(Path(init.path))


def load_path(path: Path) -> tuple[GPT, Path, dict]:
    """A transformers directory (config.json), a stage directory (model.pt) or a checkpoint (.ckpt, .pt)."""
    from pipeline.model.export import import_transformers

    where = {"stage": None, "path": str(path.resolve())}
    if path.is_dir() and (path / "config.json").is_file():
        model, near = import_transformers(path), [path]
    elif path.is_dir() and (path / MODEL_FILE).is_file():
        model, near = load_model(path), [path]
    elif path.is_file() and path.suffix in (".ckpt", ".pt"):
        model, near = load_model(path), [path.parent, path.parent.parent]
    else:
        raise BadInput(f"sft.init.path={path}: expected a transformers directory (config.json), a directory with "
                       f"{MODEL_FILE}, or a .ckpt file")
    tokenizer_json = next((d / "tokenizer.json" for d in near if (d / "tokenizer.json").is_file()), None)
    if tokenizer_json is None:
        raise BadInput(f"sft.init.path={path}: no tokenizer.json in {' or '.join(map(str, near))}")
    return model, tokenizer_json, where


def read_sources(cfg: DictConfig) -> tuple[dict[str, ReadResult], dict[str, float]]:
    if not cfg.sft.sources:
        raise BadInput("sft.sources is empty: name instruction data, e.g. "
                       "+sft.sources.alpaca={format: alpaca, path: <file>}")
    results, weights = {}, {}
    for name, node in cfg.sft.sources.items():
        source = typed(node, SftSource, f"sft.sources.{name}")
        results[name] = read_source(source.format, source.path, name, **source.options)
        weights[name] = source.weight
    return results, weights


def encode_split(conversations: dict[str, list[Conversation]], tokenizer: Tokenizer, spec: SftConfig,
                 max_tokens: int, bos: str, eos: str, limit: Optional[int] = None) -> tuple[dict, dict]:
    """Per source: the encoded examples (the first ``limit``) and the counts of encode_all."""
    examples, counts = {}, {}
    for name, items in conversations.items():
        encoded, counted = encode_all(items, tokenizer, spec.template, max_tokens, bos, eos, spec.drop_truncated)
        examples[name], counts[name] = encoded[:limit], counted
    return examples, counts


def lora_spec(spec: SftConfig, tokenizer: Tokenizer) -> LoraSpec:
    """``sft.lora`` as peft takes it; with ``chat_tokens`` the template's markers' embedding rows train too."""
    s = spec.lora
    markers = get_template(spec.template).special_tokens if s.chat_tokens else ()
    tokens = [tokenizer.token_to_id(t) for t in markers]
    missing = [t for t, i in zip(markers, tokens) if i is None]
    if missing:
        raise BadInput(f"the tokenizer lacks the chat markers {missing} (sft.lora.chat_tokens)")
    return LoraSpec(rank=s.rank, alpha=s.alpha, dropout=s.dropout, targets=list(s.targets), bias=s.bias,
                    tokens=tokens)


def data_metrics(read: dict[str, ReadResult], train_counts: dict, val_counts: dict) -> dict:
    out = {}
    for name, result in read.items():
        out[f"data/{name}/read"] = len(result.conversations)
        out[f"data/{name}/bad_records"] = sum(result.bad.values())
        out[f"data/{name}/train_examples"] = train_counts[name]["kept"]
        out[f"data/{name}/val_examples"] = val_counts[name]["kept"]
        for key in ("truncated", "dropped_too_long", "dropped_no_trained_tokens"):
            out[f"data/{name}/{key}"] = train_counts[name][key] + val_counts[name][key]
    out["data/train_examples"] = sum(c["kept"] for c in train_counts.values())
    out["data/train_tokens"] = sum(c["tokens"] for c in train_counts.values())
    out["data/trained_tokens"] = sum(c["trained_tokens"] for c in train_counts.values())
    return out


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    spec = typed(cfg.sft, SftConfig, "sft")
    special = cfg.tokenizer.special_tokens
    bos, eos, pad = special.bos, special.eos, special.pad
    model, tokenizer_json, base = base_model(cfg, ctx)
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    pad_id = tokenizer.token_to_id(pad)
    if pad_id is None:
        raise BadInput(f"{tokenizer_json} has no pad token {pad!r} (tokenizer.special_tokens.pad)")
    context = model.cfg.context
    max_tokens = min(spec.max_tokens or context, context)
    template = get_template(spec.template)

    read, weights = read_sources(cfg)
    for name, result in read.items():
        if result.bad:
            print(f"sft: {name}: skipped {sum(result.bad.values())} bad records "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(result.bad.items()))})")
    mix = mixture(read, weights, spec.val_fraction, cfg.seed)
    by_source: dict[str, list[Conversation]] = {name: [] for name in read}
    for conversation in mix.train:
        by_source[conversation.source].append(conversation)
    train, train_counts = encode_split(by_source, tokenizer, spec, max_tokens, bos, eos)
    val, val_counts = encode_split(mix.val, tokenizer, spec, max_tokens, bos, eos, limit=spec.val_max_per_source)
    val = {name: examples for name, examples in val.items() if examples}
    if not val:
        raise BadInput(f"no held-out conversation is left after encoding (sft.val_fraction={spec.val_fraction}, "
                       f"counts {val_counts}); raise val_fraction")
    examples = [e for name in train for e in train[name]]
    if not examples:
        raise BadInput(f"no training conversation is left after encoding: {train_counts}")

    pl.seed_everything(cfg.seed, verbose=False)  # the same adapter initialisation on every run
    lora = lora_spec(spec, tokenizer) if spec.lora.enabled else None
    trained = add_lora(model, lora) if lora else model
    n_trainable, n_total, fraction = trainable_fraction(trained)
    print(f"sft: {'LoRA' if spec.lora.enabled else 'full fine-tuning'}: {n_trainable:,} of {n_total:,} parameters "
          f"train ({fraction:.2%}); {len(examples):,} training conversations, "
          f"{sum(len(v) for v in val.values())} held out")
    module = SFTModule(trained, spec.optim, spec.max_steps, adapters_only=spec.lora.enabled)
    data = SFTData(examples, val, spec.micro_batch_size, spec.grad_accum, cfg.seed, pad_id,
                   pack_context=max_tokens if spec.packing else None)

    packing = {}
    if spec.packing:
        stats = packing_stats(examples, data.batches.items, max_tokens, batch_size=spec.micro_batch_size)
        packing = {"data/packed_rows": stats["rows"], "data/packing_fill": stats["fill"],
                   "data/padded_fill": stats["padded_fill"]}
        print(f"sft: packing {len(examples):,} conversations into {stats['rows']:,} rows of {max_tokens} tokens: "
              f"{stats['fill']:.0%} of each row is real tokens, against {stats['padded_fill']:.0%} when padded")
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    # "all" first: val/loss is every source together (SFTModule.val_losses), then val_<source>/loss
    outcome = fit(module, data, ["all", *val], {}, typed(cfg.trainer, TrainerSpec, "trainer"), spec,
                  ctx.checkpoint_dir, log=lambda metrics, step: ctx.run.log_metrics(metrics, step=step),
                  write_text=ctx.run.log_text, evaluate_first=True,
                  tokens_per_step=data.batches.tokens_per_micro_batch * spec.grad_accum)
    if ctx.rank:
        return StageResult()
    before = outcome.before or before_metrics(ctx)

    held = {c.id: c for convs in mix.val.values() for c in convs}
    prompts = [held[e.id] for name in val for e in val[name][:spec.generate.per_source]]
    generated = generations(prompts, trained, cfg, ctx, spec, tokenizer, template) if prompts else {}

    metrics = {**outcome.metrics, **before, **generated, **packing, **data_metrics(read, train_counts, val_counts),
               "sft/trainable_params": n_trainable, "sft/total_params": n_total, "sft/trainable_fraction": fraction}
    comparison = comparison_table(metrics, list(val))
    (ctx.build_dir / "comparison.md").write_text(comparison)
    ctx.run.log_artifact(ctx.build_dir / "comparison.md")
    print(comparison)

    outputs = publish(trained, lora, ctx, tokenizer_json, template)
    outputs["base"] = base
    if any(r.bad for r in read.values()):
        ctx.run.log_dict({name: {"counts": r.bad, "examples": r.bad_examples} for name, r in read.items() if r.bad},
                         "bad_records.json")
    counts = {"steps": spec.max_steps, "resumed_from": outcome.resumed_from, "mixture": mix.counts,
              "bad_records": {name: r.bad for name, r in read.items()},
              "encoded": {"train": train_counts, "val": val_counts}}
    return StageResult(counts=counts, metrics=metrics, outputs=outputs, step=spec.max_steps)


def generations(prompts: list[Conversation], trained, cfg: DictConfig, ctx: StageContext, spec: SftConfig,
                tokenizer: Tokenizer, template) -> dict[str, float]:
    """Replies to held-out instructions by the base model and the fine-tuned one, scored and logged side by side."""
    special = cfg.tokenizer.special_tokens
    args = (tokenizer, prompts, template, special.bos, special.eos, spec.generate.max_new_tokens)
    tuned = generate_replies(trained, *args)
    if spec.lora.enabled:
        with trained.disable_adapter():  # the base model is the same weights with the adapter off
            original = generate_replies(trained, *args)
    else:
        original = generate_replies(base_model(cfg, ctx)[0], *args)
    rows = compare(prompts, original.replies, tuned.replies)
    ctx.run.client.log_table(ctx.run.run_id, data={k: [r[k] for r in rows] for k in rows[0]},
                             artifact_file="generations.json")
    (ctx.build_dir / "generations.md").write_text(markdown_table(rows, spec.generate.show))
    ctx.run.log_artifact(ctx.build_dir / "generations.md")
    return {**summary(rows), "gen/sft/unfinished": tuned.unfinished, "gen/base/unfinished": original.unfinished,
            "gen/truncated_prompts": tuned.truncated_prompts}


def comparison_table(metrics: dict[str, float], sources: list[str]) -> str:
    """Base vs fine-tuned, one row per measure: held-out loss per source, exact match and ROUGE-L."""
    rows = [("held-out loss (nats/token), all", "before/loss", "val/loss")]
    rows += [(f"held-out loss, {name}", f"before_{name}/loss", f"val_{name}/loss") for name in sources]
    rows += [(f"{label}{'' if not source else ', ' + source}", f"gen/base/{key}", f"gen/sft/{key}")
             for source in [None, *sources]
             for label, metric in (("exact match", "exact_match"), ("ROUGE-L F1", "rouge_l"))
             for key in [metric if source is None else f"{source}/{metric}"]]
    lines = ["| measure | base | fine-tuned |", "|---|---:|---:|"]
    for label, base_key, tuned_key in rows:
        if base_key in metrics and tuned_key in metrics:
            lines.append(f"| {label} | {metrics[base_key]:.3f} | {metrics[tuned_key]:.3f} |")
    return "\n".join(lines) + "\n"


def publish(trained, lora: Optional[LoraSpec], ctx: StageContext, tokenizer_json: Path, template) -> dict:
    """The adapter (or the whole model), the tokenizer and its chat template, the kept checkpoints."""
    out = ctx.build_dir
    if lora:
        save_adapter(trained, out / ADAPTER)
        ctx.run.client.log_artifacts(ctx.run.run_id, str(out / ADAPTER), ADAPTER)
        weights = {"adapter": ADAPTER}
    else:
        save_model(trained, out / MODEL_FILE)
        weights = {"model": MODEL_FILE}
    shutil.copy2(tokenizer_json, out / "tokenizer.json")
    (out / "chat_template.jinja").write_text(template.source)
    kept = out / "checkpoints"
    kept.mkdir()
    for path in sorted(Path(ctx.checkpoint_dir).glob("step-*.ckpt")):
        path.replace(kept / path.name)
    return {**weights, "tokenizer": "tokenizer.json", "chat_template": "chat_template.jinja",
            "template": template.name, "checkpoints": sorted(p.name for p in kept.iterdir()),
            "lora": asdict(lora) if lora else None}
