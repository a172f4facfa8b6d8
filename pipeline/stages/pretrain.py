"""pretrain: train the model of conf/model/ on the tokenize stage's shards; resumable after a kill."""
from __future__ import annotations

import dataclasses
import shutil

import pytorch_lightning as pl
from omegaconf import DictConfig
from tokenizers import Tokenizer

from pipeline.config import PretrainConfig, typed
from pipeline.contract import StageContext, StageResult
from pipeline.model.gpt import ModelConfig
from pipeline.train.data import TokenDataModule, shard_arrays
from pipeline.train.module import LanguageModel
from pipeline.train.run import TrainerSpec, fit, publish

SECTIONS = ("seed", "model", "pretrain")  # trainer (devices, strategy) changes speed, not the result
RESUMABLE = True


def upstream(cfg: DictConfig) -> list[str]:
    return ["tokenize"]


def vocab_bound(tokenizer: Tokenizer) -> int:
    return max(tokenizer.get_vocab().values()) + 1  # a given tokenizer.json may leave gaps in its ids


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    spec = typed(cfg.pretrain, PretrainConfig, "pretrain")
    tok = ctx.inputs["tokenize"]
    tokenizer_json = tok.dir / tok.manifest["outputs"]["tokenizer"]
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    model_cfg = dataclasses.replace(typed(cfg.model, ModelConfig, "model"), vocab_size=vocab_bound(tokenizer))

    shards = tok.manifest["outputs"]["shards"]
    data = TokenDataModule(shard_arrays(tok.dir, shards, "train"), {"val": shard_arrays(tok.dir, shards, "val")},
                           model_cfg.context, spec.micro_batch_size, spec.grad_accum, cfg.seed, spec.eval_windows)
    pl.seed_everything(cfg.seed, verbose=False)  # the same initial weights (and dropout) on every run
    module = LanguageModel(dataclasses.asdict(model_cfg), dataclasses.asdict(spec.optim), spec.max_steps, spec.compile)
    ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tokenizer_json, ctx.checkpoint_dir / "tokenizer.json")  # so `make generate` can use a checkpoint
    outcome = fit(module, data, ["val"], {"val": tok.manifest["metrics"]["tokenize/val_bytes_per_token"]},
                  typed(cfg.trainer, TrainerSpec, "trainer"), spec, ctx.checkpoint_dir,
                  log=lambda metrics, step: ctx.run.log_metrics(metrics, step=step), write_text=ctx.run.log_text,
                  tokenizer=tokenizer, eos_id=tok.manifest["outputs"]["eos_id"])
    if ctx.rank:
        return StageResult()

    outputs = publish(module, outcome, ctx.checkpoint_dir, ctx.build_dir, tokenizer_json)
    if spec.export:
        from pipeline.model.export import export_transformers

        special = tok.manifest["outputs"]["special_tokens"]
        export_transformers(module.model, tokenizer_json, ctx.build_dir / "hf", bos=special["bos"],
                            eos=special["eos"], pad=special["pad"])
        outputs["hf"] = "hf"
    return StageResult(counts={"steps": spec.max_steps, "resumed_from": outcome.resumed_from},
                       metrics=outcome.metrics, outputs=outputs, step=spec.max_steps)
