"""One training run, shared by pretrain and cpt: build the Trainer, resume, fit, evaluate."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Union

import pytorch_lightning as pl
import torch
from tokenizers import Tokenizer

from pipeline.errors import PipelineError, StageKilled
from pipeline.model.checkpoints import latest_checkpoint
from pipeline.model.gpt import GPT, ModelConfig, flops_per_token, non_embedding_params
from pipeline.tokenizer.encode import TokenShards
from pipeline.train.callbacks import Checkpointer, FiniteLossGuard, GracefulStop, Samples, TrainMetrics, validation_results
from pipeline.train.data import TokenDataModule
from pipeline.train.module import LanguageModel
from pipeline.train.spec import TrainerSpec, TrainSpec

# Dense peak FLOP/s per device for MFU, bf16 tensor cores where the device has them (vendor datasheets).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


def precision_for(spec: TrainerSpec) -> str:
    if spec.precision != "auto":
        return spec.precision
    gpu = spec.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def peak_flops(spec: TrainerSpec) -> float:
    """Peak FLOP/s of all devices of this run, from the table, the override or the CPU setting."""
    if spec.peak_flops:
        per_device = spec.peak_flops
    elif spec.accelerator != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        per_device = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        if per_device is None:
            raise ValueError(f"no peak FLOP/s known for '{name}': set trainer.peak_flops")
    else:
        return spec.cpu_peak_flops_per_core * torch.get_num_threads() * spec.num_nodes
    return per_device * spec.devices * spec.num_nodes


def make_trainer(spec: TrainerSpec, train: TrainSpec, callbacks: list[pl.Callback]) -> pl.Trainer:
    if spec.strategy.startswith("fsdp") and not torch.cuda.is_available():
        # Lightning 2.6 refuses FSDP on anything but CUDA devices (torch's FSDP itself could run with gloo);
        # accelerator=cpu is refused when the config loads (TrainerSpec).
        raise PipelineError(f"trainer.strategy={spec.strategy} needs CUDA GPUs (Lightning runs FSDP only there), and "
                            f"this machine has none: on CPUs use trainer=ddp (trainer.devices=N processes)")
    torch.set_float32_matmul_precision(spec.matmul_precision)
    return pl.Trainer(
        accelerator=spec.accelerator, devices=spec.devices, num_nodes=spec.num_nodes, strategy=spec.strategy,
        precision=precision_for(spec), max_steps=train.max_steps, accumulate_grad_batches=train.grad_accum,
        gradient_clip_val=train.grad_clip or None,
        val_check_interval=train.eval_every_steps * train.grad_accum, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, limit_val_batches=1.0, logger=False, enable_checkpointing=False,
        use_distributed_sampler=False,  # the data module splits each step's batch between ranks itself
        callbacks=callbacks, enable_model_summary=False, enable_progress_bar=True,
    )


@dataclass
class TrainOutcome:
    metrics: dict[str, float]  # final metrics, also logged
    before: dict[str, float]  # validation before training (empty unless asked)
    resumed_from: Optional[str]
    checkpoint: Optional[Path]


def fit(module: LanguageModel, data: TokenDataModule, val_names: list[str], val_bytes_per_token: dict[str, float],
        trainer_spec: TrainerSpec, train: TrainSpec, checkpoint_dir: Path,
        log: Callable[[dict, int], None], write_text: Callable[[str, str], None],
        tokenizer=None, eos_id: Optional[int] = None, evaluate_first: bool = False,
        tokens_per_step: Optional[float] = None) -> TrainOutcome:
    """Train ``module`` to ``train.max_steps``, resuming from the newest checkpoint in ``checkpoint_dir``.

    ``tokens_per_step`` on one device defaults to full windows of the model's context (pretraining);
    fine-tuning passes its mean of real tokens, padding left out.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    n_params = non_embedding_params(module.model)
    per_device = tokens_per_step or module.model.cfg.context * train.micro_batch_size * train.grad_accum
    tokens_per_step = round(per_device * trainer_spec.devices * trainer_spec.num_nodes)
    resume = latest_checkpoint(checkpoint_dir, set_aside_broken=True)
    checkpointer = Checkpointer(checkpoint_dir, train.ckpt_every_steps, train.keep_checkpoints, last=resume)
    stop = GracefulStop(checkpointer)
    metrics = TrainMetrics(log, train.log_every_steps, tokens_per_step, flops_per_token(module.model.cfg, n_params),
                           peak_flops(trainer_spec), val_names, val_bytes_per_token)
    callbacks: list[pl.Callback] = [FiniteLossGuard(checkpointer), checkpointer, metrics, stop]
    samples = None
    if tokenizer is not None and train.sample_prompts:
        samples = Samples(lambda text, step: write_text(text, f"samples/step-{step:06d}.txt"),
                          train.sample_every_steps, list(train.sample_prompts), tokenizer, train.sample_tokens, eos_id)
        callbacks.append(samples)
    trainer = make_trainer(trainer_spec, train, callbacks)

    before: dict[str, float] = {}
    if evaluate_first and resume is None:
        trainer.validate(module, datamodule=data, verbose=False)
        before = validation_results(module, val_names, val_bytes_per_token, prefix="before")
        if trainer.is_global_zero:
            log(before, 0)
    with stop.handling_signals():
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
        except (SystemExit, KeyboardInterrupt):
            # A signal that lands outside a training step (during validation, say) makes Lightning end fit
            # its own way (SIGTERMException, a SystemExit that would exit with status 0). It is still a kill:
            # the run resumes from the last checkpoint written.
            if not stop.received:
                raise
            if stop.saved_at_exit is None:
                print(f"\n{stop.received[0]} received outside a training step; the run resumes from "
                      f"{checkpointer.last or latest_checkpoint(checkpoint_dir) or 'the start'}", flush=True)
            raise StageKilled(stop.received[0]) from None
    last = checkpointer.save(trainer)
    if trainer.global_step < train.max_steps:
        raise RuntimeError(f"training stopped at step {trainer.global_step} of {train.max_steps}")
    trainer.validate(module, datamodule=data, verbose=False)
    final = {**metrics.results,
             "model/non_embedding_params": n_params,
             "model/params": sum(p.numel() for p in module.model.parameters()),
             "train/tokens": train.max_steps * tokens_per_step,
             "train/flops": 6.0 * n_params * train.max_steps * tokens_per_step}
    if trainer.is_global_zero:
        log(final, trainer.global_step)
        if samples is not None:
            write_text(samples.text(module.model), f"samples/step-{trainer.global_step:06d}.txt")
    return TrainOutcome(final, before, str(resume) if resume else None, last)


class Tracker(Protocol):
    """Where a run's metrics and text artifacts go (the stage's MLflow run)."""

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def logged_metrics(self, prefix: str) -> dict[str, float]: ...


def train_model(init: Union[ModelConfig, GPT], train: TokenShards, val: dict[str, TokenShards], spec: TrainSpec,
                trainer: TrainerSpec, seed: int, checkpoint_dir: Path, tokenizer_json: Path, eos_id: Optional[int],
                tracker: Tracker, evaluate_first: bool = False) -> tuple[GPT, TrainOutcome]:
    """Train a new model of shape ``init`` (a ModelConfig), or continue ``init`` (a GPT), on ``train``'s shards.

    Validation scores the val split of each set in ``val`` (the first is reported unnamed); the run resumes
    from the newest checkpoint in ``checkpoint_dir``. With ``evaluate_first``, ``outcome.before`` holds the
    validation before training, measured in the run's first execution.
    """
    cfg = init if isinstance(init, ModelConfig) else init.cfg
    data = TokenDataModule(train.tokens("train"), {name: s.tokens("val") for name, s in val.items()}, cfg.context,
                           spec.micro_batch_size, spec.grad_accum, seed, spec.eval_windows)
    pl.seed_everything(seed, verbose=False)  # the same initial weights (and dropout) on every run
    module = LanguageModel(cfg.as_dict(), spec.optim.as_dict(), spec.max_steps, spec.compile)
    if isinstance(init, GPT):
        module.model.load_state_dict(init.state_dict())
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tokenizer_json, checkpoint_dir / "tokenizer.json")  # so `make generate` can use a checkpoint
    outcome = fit(module, data, list(val), {name: s.val_bytes_per_token for name, s in val.items()}, trainer, spec,
                  checkpoint_dir, log=tracker.log_metrics, write_text=tracker.log_text,
                  tokenizer=Tokenizer.from_file(str(tokenizer_json)), eos_id=eos_id, evaluate_first=evaluate_first)
    if evaluate_first and not outcome.before:  # a resumed run measured them in its first execution
        outcome.before = tracker.logged_metrics("before") or {}
    return module.model, outcome


def adaptation(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Domain gain (loss drop on the domain) and forgetting (loss rise on the original corpus), in bits per byte."""
    out = {}
    if "before/bpb" in before and "val/bpb" in after:
        out["cpt/adaptation_gain_bpb"] = before["before/bpb"] - after["val/bpb"]
    if "before_original/bpb" in before and "val_original/bpb" in after:
        out["cpt/forgetting_bpb"] = after["val_original/bpb"] - before["before_original/bpb"]
    return out
