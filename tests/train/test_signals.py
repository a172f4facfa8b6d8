"""A signal that lands during validation ends training as a kill, not as Lightning's own exit."""
from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import pytest
from torch.utils.data import DataLoader

from pipeline.errors import StageKilled
from pipeline.model.gpt import ModelConfig
from pipeline.model.checkpoints import checkpoints
from pipeline.train.data import TokenDataModule, ValWindows
from pipeline.train.module import LanguageModel, OptimSpec
from pipeline.train.run import TrainerSpec, TrainSpec, fit


class SignalDuringValidation(ValWindows):
    """Validation windows that send this process SIGTERM while the second validation reads them."""

    reads = 0

    def __getitem__(self, index):
        if index == 0:
            SignalDuringValidation.reads += 1
        if SignalDuringValidation.reads == 2 and index == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__getitem__(index)


class Data(TokenDataModule):
    def val_dataloader(self):
        return [DataLoader(SignalDuringValidation(arrays, self.context, self.eval_windows), batch_size=self.micro_batch)
                for arrays in self.val_sets.values()]


def test_sigterm_in_validation_raises_stage_killed_after_the_last_checkpoint(tmp_path, capsys):
    tokens = np.random.default_rng(0).integers(0, 50, 20_000).astype(np.uint16)
    data = Data([tokens], {"val": [tokens[:4_000]]}, context=16, micro_batch=4, accumulate=1, seed=0, eval_windows=40)
    model = ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, context=16, vocab_size=50)
    module = LanguageModel(dataclasses.asdict(model), dataclasses.asdict(OptimSpec()), 20, False)
    train = TrainSpec(max_steps=20, micro_batch_size=4, eval_every_steps=5, eval_windows=40, log_every_steps=5,
                      ckpt_every_steps=5, sample_every_steps=0)
    SignalDuringValidation.reads = 0
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StageKilled, match="SIGTERM"):  # not SystemExit: that would exit 0 and look like success
        fit(module, data, ["val"], {"val": 1.0}, TrainerSpec(), train, tmp_path, log=lambda m, s: None,
            write_text=lambda t, p: None)
    assert SignalDuringValidation.reads == 2, "the signal came during the second validation (step 10)"
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000005.ckpt", "step-000010.ckpt"]
    assert "SIGTERM received outside a training step; the run resumes from" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before, "the handlers in place before training are back"


class SignalAfterTheCallbacks(LanguageModel):
    """Sends this process SIGTERM at step ``kill_at`` after every callback's batch-end hook has run, so that
    Lightning's own check at the end of the batch, not GracefulStop's hook, is the first to see it."""

    kill_at = 7

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("kill_at", [7, 10], ids=["mid-interval", "on-a-checkpoint-step"])
def test_a_signal_after_the_batch_end_hooks_still_saves_that_step_and_resumes_exactly(tmp_path, capsys, kill_at):
    tokens = np.random.default_rng(1).integers(0, 50, 20_000).astype(np.uint16)
    model = dataclasses.asdict(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, context=16, vocab_size=50))
    train = TrainSpec(max_steps=12, micro_batch_size=4, eval_every_steps=100, eval_windows=8, log_every_steps=1,
                      ckpt_every_steps=5, sample_every_steps=0)

    def run(module_class, directory):
        import pytorch_lightning as pl
        pl.seed_everything(0, verbose=False)
        module = module_class(model, dataclasses.asdict(OptimSpec()), train.max_steps, False)
        data = TokenDataModule([tokens], {"val": [tokens[:2_000]]}, context=16, micro_batch=4, accumulate=1, seed=0,
                               eval_windows=8)
        losses = {}
        fit(module, data, ["val"], {"val": 1.0}, TrainerSpec(), train, directory,
            log=lambda m, s: losses.update({s: m["train/loss"]} if "train/loss" in m else {}),
            write_text=lambda t, p: None)
        return losses

    straight = run(LanguageModel, tmp_path / "straight")
    SignalAfterTheCallbacks.kill_at = kill_at
    with pytest.raises(StageKilled, match="SIGTERM"):
        run(SignalAfterTheCallbacks, tmp_path / "killed")
    out = capsys.readouterr().out
    assert f"at step {kill_at}; run the same command again to resume" in out and "outside" not in out, out
    assert [p.name for p in checkpoints(tmp_path / "killed")] == ["step-000005.ckpt", f"step-{kill_at:06d}.ckpt"]
    resumed = run(LanguageModel, tmp_path / "killed")
    assert min(resumed) == kill_at + 1, "the resumed run starts after the step the kill saved"
    for step in range(kill_at + 1, 13):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
