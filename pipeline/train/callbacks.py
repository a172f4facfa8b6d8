"""Callbacks of a training stage: checkpoints, a graceful stop on SIGTERM, a finite-loss guard, metrics, samples.

Each acts at optimizer-step boundaries only (after the accumulated micro-batches of one step), so a
checkpoint never holds half a step and a resumed run starts exactly where the saved one stopped.
"""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.errors import PipelineError, StageKilled
from pipeline.model.checkpoints import checkpoint_path, checkpoints
from pipeline.model.generate import DecodeSpec, generate_text
from pipeline.tracking import signal_handler


class NonFiniteLoss(PipelineError):
    pass


def step_ended(trainer: pl.Trainer, batch_idx: int) -> bool:
    """True on the micro-batch that completed an optimizer step."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


class Checkpointer(pl.Callback):
    """Every ``every_steps`` optimizer steps (and on request) write step-NNNNNN.ckpt aside, rename it into
    place, and keep the newest ``keep``."""

    def __init__(self, directory: Path, every_steps: int, keep: int, last: Optional[Path] = None):
        self.directory, self.every_steps, self.keep = Path(directory), every_steps, max(keep, 1)
        self.last = last  # the checkpoint the run resumed from

    def save(self, trainer: pl.Trainer) -> Path:
        path = checkpoint_path(self.directory, trainer.global_step)
        if self.last == path:
            return path
        tmp = path.with_name(path.name + ".tmp")
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # every rank takes part; rank 0 writes
        except BaseException:
            tmp.unlink(missing_ok=True)  # on a full disk, the space to record the failure
            raise
        if trainer.is_global_zero:
            os.replace(tmp, path)
            for old in checkpoints(self.directory)[:-self.keep]:
                old.unlink()
        trainer.strategy.barrier()
        self.last = path
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if step_ended(trainer, batch_idx) and self.every_steps and trainer.global_step % self.every_steps == 0:
            self.save(trainer)


class GracefulStop(pl.Callback):
    """On SIGTERM/SIGINT finish the current optimizer step, checkpoint, then raise StageKilled.

    A second signal raises at once. Install the handlers with ``handling_signals()`` around fit.
    """

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer
        self.received: list[str] = []
        self.at_step_end = False
        self.saved_at_exit: Optional[Path] = None

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.received:
                raise StageKilled(name)
            self.received.append(name)

        with signal_handler(handler):
            yield
        if self.received:  # arrived after the last step: training is complete, still honour the kill
            raise StageKilled(self.received[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.at_step_end = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.at_step_end = step_ended(trainer, batch_idx)
        if self.received and self.at_step_end:
            self._save_and_stop(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        # A signal that lands after this callback's batch-end hook but before Lightning's own check at the end
        # of the batch makes Lightning stop (SIGTERMException) with the step complete: save that step too (the
        # caller turns the exception into StageKilled). On more than one process the ranks may not agree that
        # they are at a step end, so they keep the last checkpoint rather than meet at a barrier.
        if (self.received and isinstance(exception, SIGTERMException) and self.at_step_end
                and trainer.world_size == 1):
            try:
                self.saved_at_exit = self._save(trainer)
            except Exception as e:  # a full disk, say: still a kill, resumed from the last checkpoint written
                print(f"\n{self.received[0]} received; saving step {trainer.global_step} failed ({e})", flush=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.at_step_end = False  # a checkpoint saved mid-validation would resume mid-validation

    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        self._save(trainer)
        raise StageKilled(self.received[0])

    def _save(self, trainer: pl.Trainer) -> Path:
        path = self.checkpointer.save(trainer)
        print(f"\n{self.received[0]} received: saved {path} at step {trainer.global_step}; "
              f"run the same command again to resume", flush=True)
        return path


class FiniteLossGuard(pl.Callback):
    """Stop with a message naming the step and the last good checkpoint when the loss is NaN or infinite."""

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            last = self.checkpointer.last
            raise NonFiniteLoss(f"the training loss is {float(loss)} at step {trainer.global_step}; the last good "
                                f"checkpoint is {last or 'none (no checkpoint written yet)'}. Lower the learning rate "
                                f"or raise warmup_steps and run again (a new config: it starts afresh, and these "
                                f"checkpoints are kept aside)")


class TrainMetrics(pl.Callback):
    """Train and validation metrics to ``emit(metrics, step)`` on rank 0.

    tokens/s excludes validation time; MFU = achieved training FLOPs per second / ``peak_flops``.
    """

    def __init__(self, log: Callable[[dict, int], None], every_steps: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops: float, val_names: list[str],
                 val_bytes_per_token: dict[str, float], prefix: str = "val"):
        # not self.log: Lightning assigns its module's log() to every callback's `log` attribute
        self.emit, self.every_steps, self.tokens_per_step = log, max(every_steps, 1), tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.val_names, self.val_bytes_per_token, self.prefix = val_names, val_bytes_per_token, prefix
        self.losses: list[float] = []
        self.last_time: Optional[float] = None
        self.last_step = 0
        self.val_started: Optional[float] = None
        self.results: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.last_time, self.last_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        if not step_ended(trainer, batch_idx):
            return
        step = trainer.global_step
        if step % self.every_steps and step != trainer.max_steps:
            self.losses = []
            return
        loss = sum(self.losses) / len(self.losses)
        if trainer.world_size > 1:  # the step's loss over the whole global batch, as one process would see it
            loss = float(trainer.strategy.reduce(torch.tensor(loss, device=pl_module.device), reduce_op="mean"))
        now = time.perf_counter()
        tokens_per_s = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
        metrics = {
            "train/loss": loss,
            "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train/grad_norm": pl_module.grad_norm or 0.0,
            "train/tokens": step * self.tokens_per_step,
            "train/tokens_per_s": tokens_per_s,
            "train/mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
        }
        self.losses, self.last_time, self.last_step = [], now, step
        extra = getattr(pl_module, "pop_train_metrics", None)  # a module's own training measures (dpo's rewards)
        metrics.update(extra() if extra else {})
        if trainer.is_global_zero:
            self.emit(metrics, step)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.last_time is not None and self.val_started is not None:
            self.last_time += time.perf_counter() - self.val_started  # do not count evaluation as training time
        if trainer.sanity_checking:
            return
        self.results = validation_results(pl_module, self.val_names, self.val_bytes_per_token, self.prefix)
        if trainer.is_global_zero and self.results:
            self.emit(self.results, trainer.global_step)


def validation_results(module: pl.LightningModule, names: list[str], bytes_per_token: dict[str, float],
                       prefix: str = "val") -> dict[str, float]:
    """The last validation's metrics: the module's own ``val_metrics(names, prefix)`` when it has one (dpo),
    else ``evaluation_metrics`` of its ``val_losses()``."""
    own = getattr(module, "val_metrics", None)
    return own(names, prefix) if own else evaluation_metrics(module.val_losses(), names, bytes_per_token, prefix)


def evaluation_metrics(losses: dict[int, float], names: list[str], bytes_per_token: dict[str, float],
                       prefix: str = "val") -> dict[str, float]:
    """loss (nats/token), perplexity and bits per byte per validation set; the first set unnamed."""
    out = {}
    for i, loss in losses.items():
        key = prefix if i == 0 else f"{prefix}_{names[i]}"
        out[f"{key}/loss"] = loss
        out[f"{key}/ppl"] = math.exp(min(loss, 50.0))
        if names[i] in bytes_per_token:
            out[f"{key}/bpb"] = loss / math.log(2) / bytes_per_token[names[i]]
    return out


class Samples(pl.Callback):
    """Greedy continuations of fixed prompts every ``every_steps`` steps, as text artifacts."""

    def __init__(self, write: Callable[[str, int], None], every_steps: int, prompts: list[str], tokenizer,
                 max_new_tokens: int, eos_id: Optional[int]):
        self.write, self.every_steps, self.prompts, self.tokenizer = write, every_steps, prompts, tokenizer
        self.max_new_tokens, self.eos_id = max_new_tokens, eos_id

    def text(self, model) -> str:
        spec = DecodeSpec(strategy="greedy", max_new_tokens=self.max_new_tokens)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            parts = [f"### {p!r}\n{p}{generate_text(model, self.tokenizer, p, spec, eos_id=self.eos_id)}\n"
                     for p in self.prompts]
        model.train(was_training)
        return "\n".join(parts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_steps and self.prompts and step_ended(trainer, batch_idx) and step % self.every_steps == 0 \
                and trainer.is_global_zero:
            self.write(self.text(pl_module.model), step)
