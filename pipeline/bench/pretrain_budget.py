"""Validation loss after a fixed token budget: the default schedule (warmup + cosine) vs a constant learning rate.

Both runs train the same model (conf/model/, identical initial weights) on the demo's token shards
through the pretrain stage's Lightning path (``LanguageModel``, ``TokenDataModule``), for the same
steps and windows at the same peak learning rate; only the schedule differs. Validation: the
stage's ``ValWindows`` over the tokenize stage's val split, once, after the budget is spent.
ratio = baseline val loss / candidate val loss, so above 1 means the schedule helps.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from pipeline.bench.pretrain_step import (StepTimer, bench_trainer, demo_shards, quiet_lightning, sigterm_fails,
                                          tokenize_dir, tokenizer_vocab)
from pipeline.config import compose
from pipeline.errors import MissingUpstream
from pipeline.train.data import TokenDataModule, shard_arrays
from pipeline.train.module import LanguageModel, OptimSpec


GOAL = 1.0


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    quiet_lightning()
    cfg = compose(*(["model=tiny"] if quick else []), *overrides)
    found = demo_shards(cfg)
    if found is None:
        raise MissingUpstream(f"{tokenize_dir(cfg) / 'manifest.json'} is missing: run 'make tokenize' first")
    stage_dir, manifest = found
    train = cfg.pretrain
    trainer_spec = cfg.trainer
    model_cfg = dataclasses.replace(cfg.model,
                                    vocab_size=tokenizer_vocab(stage_dir, manifest))
    steps = 50 if quick else 500
    micro = train.micro_batch_size
    tokens_per_step = micro * model_cfg.context
    # The schedule as configured, its warmup capped at a fifth of the budget so a short run still decays.
    scheduled = dataclasses.replace(train.optim, warmup_steps=min(train.optim.warmup_steps, steps // 5))
    constant = dataclasses.replace(train.optim, schedule="constant", warmup_steps=0)
    shards = manifest["outputs"]["shards"]
    train_arrays, val_arrays = shard_arrays(stage_dir, shards, "train"), shard_arrays(stage_dir, shards, "val")
    bytes_per_token = manifest["metrics"]["tokenize/val_bytes_per_token"]

    def train_for_budget(optim: OptimSpec) -> dict:
        data = TokenDataModule(train_arrays, {"val": val_arrays}, model_cfg.context, micro, 1, cfg.seed,
                               train.eval_windows)
        torch.manual_seed(cfg.seed)
        module = LanguageModel(model_cfg.as_dict(), optim.as_dict(), steps, train.compile)
        timer = StepTimer(first=0, last=steps - 1)
        trainer = bench_trainer(trainer_spec, steps, train.grad_clip, [timer], validate=True)
        with sigterm_fails("pretrain_budget"):
            trainer.fit(module, datamodule=data)
            trainer.validate(module, datamodule=data, verbose=False)
        loss = module.val_losses()[0]
        return {"val_loss": round(loss, 5), "val_bpb": round(loss / math.log(2) / bytes_per_token, 5),
                "train_loss": round(timer.final_loss, 5),
                "tokens_per_s": round(steps * tokens_per_step / timer.seconds, 1)}

    baseline = train_for_budget(constant)
    candidate = train_for_budget(scheduled)
    ratio = baseline["val_loss"] / candidate["val_loss"]
    return {
        "name": "pretrain_budget",
        "what": "validation loss after a fixed token budget: warmup + cosine (the default) vs a constant learning rate",
        "data": f"token shards of {stage_dir}",
        "model": {k: getattr(model_cfg, k) for k in ("block", "n_layer", "n_head", "d_model", "d_ff", "context",
                                                       "vocab_size")},
        "budget": {"steps": steps, "micro_batch": micro, "tokens": steps * tokens_per_step,
                   "val_windows": train.eval_windows, "val_bytes_per_token": round(bytes_per_token, 4)},
        "baseline": {"name": f"constant lr {constant.lr:g}, no warmup", **baseline},
        "candidate": {"name": f"{scheduled.schedule}: warmup {scheduled.warmup_steps} steps, peak lr {scheduled.lr:g}, "
                              f"floor x{scheduled.min_lr_ratio:g}", **candidate},
        "note": f"val bits per byte: constant {baseline['val_bpb']:.4f}, {scheduled.schedule} "
                f"{candidate['val_bpb']:.4f} after {steps * tokens_per_step:,} tokens; one seed each",
        "overrides": list(overrides),
        "ratio": round(ratio, 4),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
    }
