"""cpt: continue pretraining a model on a domain corpus with its own tokenizer; report adaptation and forgetting.

Validation runs on two sets before and after training: the domain's held-out documents ("val") and
the original corpus's validation shards ("val_original", when the tokenizer is the tokenize stage's).
"""
from __future__ import annotations

import dataclasses
import shutil
import hashlib
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from tokenizers import Tokenizer

from pipeline.config import CptConfig, typed
from pipeline.contract import StageContext, StageResult
from pipeline.data.sources import SourceSpec, load_documents
from pipeline.errors import BadInput
from pipeline.model.gpt import GPT, load_model
from pipeline.stages.pretrain import vocab_bound
from pipeline.tokenizer.encode import assign_splits, encode_documents, write_token_shards, write_val_documents
from pipeline.train.data import TokenDataModule, shard_arrays
from pipeline.train.module import LanguageModel
from pipeline.train.run import TrainerSpec, fit, publish

SECTIONS = ("seed", "cpt")
RESUMABLE = True


def upstream(cfg: DictConfig) -> list[str]:
    init = cfg.cpt.init
    if (init.stage is None) == (init.path is None):
        raise BadInput(f"cpt.init: set 'stage' or 'path', not {'both' if init.stage else 'neither'}")
    return sorted({init.stage, "tokenize"} - {None})


def initial_model(cfg: DictConfig, ctx: StageContext) -> tuple[GPT, Path]:
    """The model to continue and its tokenizer.json."""
    init = cfg.cpt.init
    if init.stage:
        directory = ctx.inputs[init.stage].dir
        return load_model(directory), directory / "tokenizer.json"
    from pipeline.model.export import import_transformers

    directory = Path(init.path)
    if not (directory / "tokenizer.json").is_file():
        raise BadInput(f"cpt.init.path={directory} has no tokenizer.json (a transformers fast tokenizer is needed)")
    return import_transformers(directory), directory / "tokenizer.json"


def encode_domain(cfg: DictConfig, ctx: StageContext, tokenizer: Tokenizer, eos_id: int) -> dict:
    """Encode cpt.sources with the model's tokenizer into train/val shards under build_dir/data."""
    if not cfg.cpt.sources:
        raise BadInput("cpt.sources is empty: name the domain corpus, e.g. +cpt.sources.peps.path=<file>")
    specs = {name: typed(node, SourceSpec, f"cpt.sources.{name}") for name, node in cfg.cpt.sources.items()}
    docs = assign_splits(load_documents(specs, cache_dir=str(ctx.cache_dir / "datasets")),
                         val_fraction=cfg.cpt.val_fraction, seed=cfg.seed, num_proc=cfg.tokenize.num_proc)
    out = ctx.build_dir / "data"
    out.mkdir()
    write_val_documents(docs, list(specs), out / "val.parquet")  # text, for the evaluate stage
    encoded = encode_documents(docs, tokenizer, eos_id, out / "encoded.arrow", num_proc=cfg.tokenize.num_proc,
                               batch_size=cfg.tokenize.batch_size)
    shards = write_token_shards(encoded, out, vocab_bound(tokenizer), cfg.tokenize.max_shard_tokens, len(specs))
    encoded.cleanup_cache_files()
    (out / "encoded.arrow").unlink(missing_ok=True)
    val = shards["counts"]["val"]
    if not sum(val["tokens"]):
        raise BadInput(f"the domain validation split is empty ({len(docs)} documents, cpt.val_fraction="
                       f"{cfg.cpt.val_fraction}); raise val_fraction or add documents")
    return {"dir": out, "index": shards["index"], "counts": shards["counts"],
            "val_bytes_per_token": sum(val["bytes"]) / sum(val["tokens"])}


def same_file(a: Path, b: Path) -> bool:
    return hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    spec = typed(cfg.cpt, CptConfig, "cpt")
    model, tokenizer_json = initial_model(cfg, ctx)
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    eos_id = tokenizer.token_to_id(cfg.tokenizer.special_tokens.eos)
    if eos_id is None:
        raise BadInput(f"{tokenizer_json} has no '{cfg.tokenizer.special_tokens.eos}' token (tokenizer.special_tokens.eos)")
    domain = encode_domain(cfg, ctx, tokenizer, eos_id)

    context = model.cfg.context
    val_sets = {"val": shard_arrays(domain["dir"], domain["index"], "val")}
    bytes_per_token = {"val": domain["val_bytes_per_token"]}
    tok = ctx.inputs["tokenize"]
    if same_file(tokenizer_json, tok.dir / tok.manifest["outputs"]["tokenizer"]):
        val_sets["original"] = shard_arrays(tok.dir, tok.manifest["outputs"]["shards"], "val")
        bytes_per_token["original"] = tok.manifest["metrics"]["tokenize/val_bytes_per_token"]
    else:
        print("cpt: the model's tokenizer is not the tokenize stage's, so forgetting on the original corpus is "
              "not measured")
    data = TokenDataModule(shard_arrays(domain["dir"], domain["index"], "train"), val_sets, context,
                           spec.micro_batch_size, spec.grad_accum, cfg.seed, spec.eval_windows)
    pl.seed_everything(cfg.seed, verbose=False)  # the same initial weights (and dropout) on every run
    module = LanguageModel(dataclasses.asdict(model.cfg), dataclasses.asdict(spec.optim), spec.max_steps, spec.compile)
    module.model.load_state_dict(model.state_dict())

    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tokenizer_json, ctx.checkpoint_dir / "tokenizer.json")  # so `make generate` can use a checkpoint
    outcome = fit(module, data, list(val_sets), bytes_per_token, typed(cfg.trainer, TrainerSpec, "trainer"), spec,
                  ctx.checkpoint_dir, log=lambda metrics, step: ctx.run.log_metrics(metrics, step=step),
                  write_text=ctx.run.log_text, tokenizer=tokenizer, eos_id=eos_id, evaluate_first=True)
    if ctx.rank:
        return StageResult()
    before = outcome.before or before_metrics(ctx)  # a resumed run measured them in its first execution
    metrics = {**outcome.metrics, **before, **adaptation(before, outcome.metrics)}
    outputs = publish(module, outcome, ctx.checkpoint_dir, ctx.build_dir, tokenizer_json)
    outputs["data"] = {"dir": "data", "shards": domain["index"]}
    outputs["val_documents"] = "data/val.parquet"
    if spec.export:
        from pipeline.model.export import export_transformers

        special = cfg.tokenizer.special_tokens
        export_transformers(module.model, tokenizer_json, ctx.build_dir / "hf", bos=special.bos, eos=special.eos,
                            pad=special.pad)
        outputs["hf"] = "hf"
    counts = {"steps": spec.max_steps, "resumed_from": outcome.resumed_from,
              "domain": {split: {k: sum(v) for k, v in c.items()} for split, c in domain["counts"].items()}}
    return StageResult(counts=counts, metrics=metrics, outputs=outputs, step=spec.max_steps)


def before_metrics(ctx: StageContext) -> dict[str, float]:
    logged = ctx.run.client.get_run(ctx.run.run_id).data.metrics
    return {k: v for k, v in logged.items() if k.startswith("before")}


def adaptation(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Domain gain (loss drop on the domain) and forgetting (loss rise on the original corpus), in bits per byte."""
    out = {}
    if "before/bpb" in before and "val/bpb" in after:
        out["cpt/adaptation_gain_bpb"] = before["before/bpb"] - after["val/bpb"]
    if "before_original/bpb" in before and "val_original/bpb" in after:
        out["cpt/forgetting_bpb"] = after["val_original/bpb"] - before["before_original/bpb"]
    return out
