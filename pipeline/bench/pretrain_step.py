"""Training throughput (tokens/s): the pretrain stage's Lightning step vs a hand-written PyTorch loop.

Both sides train the same model (conf/model/, identical initial weights) on the same windows
(``TrainWindows``, deterministic per step) with the same AdamW parameter groups, learning-rate
schedule and gradient clipping. The plain loop is what a careful person writes by hand:
zero_grad(set_to_none), forward, token_loss, backward, clip_grad_norm_, step, scheduler.step.
The Lightning side is the project's ``LanguageModel`` fed by ``TokenDataModule``, with a Trainer
built as ``make_trainer`` builds it, less validation, checkpoints, logger and progress bar.
Each side runs some untimed steps first; the clock covers the next ``steps`` (data fetch included)
and excludes building and tearing down the Trainer. Runs alternate, and the median run is reported,
with the median single step beside it: on a shared machine a few stalled steps can swing a whole run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.config import compose
from pipeline.data.shards import token_dtype
from pipeline.errors import PipelineError
from pipeline.model.gpt import GPT
from pipeline.train.data import TokenDataModule, TrainWindows, shard_arrays
from pipeline.train.module import LanguageModel, LRSchedule, param_groups, token_loss
from pipeline.train.run import TrainerSpec, precision_for

GOAL = 0.95  # Lightning should keep at least this share of the plain loop's tokens/s


def quiet_lightning() -> None:
    """Lightning's start-up banner and its hint about DataLoader workers (the windows are cut in
    the main process on purpose: a worker would only add a copy) would bury the benchmark table."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")  # Lightning 2.6 on torch 2.13


def bench_trainer(spec: TrainerSpec, max_steps: int, grad_clip: float, callbacks: list[pl.Callback],
                  validate: bool = False) -> pl.Trainer:
    """A Trainer as ``make_trainer`` builds it on one device, less checkpoints, logger and progress bar.

    validate=False: no validation at all; True: none during fit, only when ``trainer.validate`` is called.
    """
    torch.set_float32_matmul_precision(spec.matmul_precision)
    return pl.Trainer(
        accelerator=spec.accelerator, devices=1, precision=precision_for(spec), max_steps=max_steps,
        gradient_clip_val=grad_clip or None, val_check_interval=max_steps + 1, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, limit_val_batches=1.0 if validate else 0, logger=False,
        enable_checkpointing=False, use_distributed_sampler=False, callbacks=callbacks,
        enable_model_summary=False, enable_progress_bar=False,
    )


@contextmanager
def sigterm_fails(name: str) -> Iterator[None]:
    """Lightning ends a run that receives SIGTERM with ``SystemExit()``, exit status 0, and says so only at
    INFO level: a killed benchmark would look like one that passed, with no result written."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(f"{name}: killed by SIGTERM while training; no result written") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """Clock marks at the start of batch ``first`` and the end of each batch up to ``last``, and the training
    loss of ``last``. Successive marks give each step's time, so a noisy machine's stalls can be told apart."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.marks: list[float] = []
        self.final_loss: Optional[float] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            _sync(pl_module.device)
            self.marks = [time.perf_counter()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first <= batch_idx <= self.last:
            _sync(pl_module.device)
            self.marks.append(time.perf_counter())
        if batch_idx == self.last:
            self.final_loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)

    @property
    def seconds(self) -> float:
        return self.marks[-1] - self.marks[0]

    @property
    def step_seconds(self) -> list[float]:
        return np.diff(self.marks).tolist()


def tokenize_dir(cfg) -> Path:
    return Path(cfg.paths.outputs_dir) / cfg.name / "tokenize"


def demo_shards(cfg) -> Optional[tuple[Path, dict]]:
    """The tokenize stage's directory and manifest of this experiment, if it has run."""
    manifest = tokenize_dir(cfg) / "manifest.json"
    return (manifest.parent, json.loads(manifest.read_text())) if manifest.is_file() else None


def tokenizer_vocab(stage_dir: Path, manifest: dict) -> int:
    from tokenizers import Tokenizer

    from pipeline.tokenizer.build import vocab_bound  # the pretrain stage sizes the model this way

    return vocab_bound(Tokenizer.from_file(str(stage_dir / manifest["outputs"]["tokenizer"])))


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    quiet_lightning()
    cfg = compose(*(["model=tiny"] if quick else []), *overrides)
    train = cfg.pretrain
    trainer_spec = cfg.trainer
    untimed, steps, rounds = (2, 15, 2) if quick else (5, 50, 5)
    max_steps = untimed + steps

    found = demo_shards(cfg)
    if found:
        stage_dir, manifest = found
        shards = shard_arrays(stage_dir, manifest["outputs"]["shards"], "train")
        vocab = tokenizer_vocab(stage_dir, manifest)
        data = f"token shards of {stage_dir}"
    else:  # step speed does not depend on what the ids mean
        vocab = cfg.tokenizer.vocab_size
        ids = np.random.default_rng(cfg.seed).integers(0, vocab, size=2_000_000)
        shards = [ids.astype(token_dtype(vocab))]
        data = f"random token ids (no {tokenize_dir(cfg) / 'manifest.json'})"
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    micro = train.micro_batch_size
    precision = precision_for(trainer_spec)
    if precision not in ("32-true", "bf16-mixed"):
        raise PipelineError(f"trainer.precision={precision}: the plain loop of pretrain_step knows 32-true and "
                            f"bf16-mixed; pass -o trainer.precision=32-true or bf16-mixed")
    device = torch.device("cuda" if trainer_spec.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
                          else "cpu")

    def plain() -> tuple[list[float], float]:
        windows = TrainWindows(shards, model_cfg.context, micro, 1, cfg.seed)
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg).to(device)
        forward = torch.compile(model) if train.compile else model
        s = train.optim
        optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=tuple(s.betas), eps=s.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(s, max_steps))
        torch.set_float32_matmul_precision(trainer_spec.matmul_precision)
        model.train()
        marks = []
        for step in range(max_steps):
            if step == untimed:
                _sync(device)
                marks.append(time.perf_counter())
            batch = windows[step].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = token_loss(forward(batch[:, :-1])[0], batch[:, 1:])
            loss.backward()
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            scheduler.step()
            if step >= untimed:  # the same marks as StepTimer's, so both sides are timed alike
                _sync(device)
                marks.append(time.perf_counter())
        return np.diff(marks).tolist(), loss.item()

    def lightning() -> tuple[list[float], float]:
        datamodule = TokenDataModule(shards, {}, model_cfg.context, micro, 1, cfg.seed, train.eval_windows)
        torch.manual_seed(cfg.seed)
        module = LanguageModel(model_cfg.as_dict(), train.optim.as_dict(), max_steps, train.compile)
        timer = StepTimer(first=untimed, last=max_steps - 1)
        with sigterm_fails("pretrain_step"):
            bench_trainer(trainer_spec, max_steps, train.grad_clip, [timer]).fit(module, datamodule=datamodule)
        return timer.step_seconds, timer.final_loss

    runs = {plain: [], lightning: []}
    for r in range(rounds):  # interleaved, first side swapped each round, so drift in machine load hits both alike
        for side in ((plain, lightning) if r % 2 == 0 else (lightning, plain)):
            runs[side].append(side())
    tokens_per_step = micro * model_cfg.context

    def summary(side) -> dict:
        per_run = [tokens_per_step * len(steps_s) / sum(steps_s) for steps_s, _ in runs[side]]
        every_step = [t for steps_s, _ in runs[side] for t in steps_s]
        return {"tokens_per_s": round(statistics.median(per_run), 1), "runs": [round(x, 1) for x in per_run],
                # The median step shrugs off stalls when another process takes the cores for a moment.
                "median_step_tokens_per_s": round(tokens_per_step / statistics.median(every_step), 1),
                "final_loss": round(runs[side][-1][1], 5)}

    baseline, candidate = summary(plain), summary(lightning)
    ratio = candidate["tokens_per_s"] / baseline["tokens_per_s"]
    steady = candidate["median_step_tokens_per_s"] / baseline["median_step_tokens_per_s"]
    return {
        "name": "pretrain_step",
        "what": "training tokens/s: the pretrain stage's Lightning step vs a hand-written PyTorch loop, same model, "
                "weights and data",
        "data": data,
        "model": {k: getattr(model_cfg, k) for k in ("block", "n_layer", "n_head", "d_model", "d_ff", "context",
                                                       "vocab_size")},
        "micro_batch": micro, "untimed_steps": untimed, "timed_steps": steps, "rounds": rounds,
        "device": str(device), "precision": precision, "torch_threads": torch.get_num_threads(),
        "baseline": {"name": "plain PyTorch loop (zero_grad, forward, loss, backward, clip, step, scheduler)",
                     **baseline},
        "candidate": {"name": "LanguageModel + pl.Trainer, TokenDataModule", **candidate},
        "median_step_ratio": round(steady, 3),
        # Same initial weights, same windows, same optimizer: the two should train the same thing.
        "note": f"training loss after {max_steps} steps: plain {baseline['final_loss']:.4f}, Lightning "
                f"{candidate['final_loss']:.4f}; ratio of median step times {steady:.3f}",
        "overrides": list(overrides),
        "ratio": round(ratio, 3),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
    }
