"""train_model: a new model or a continued one, the same result for the same seed, 'before' kept across a resume."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.data.shards import ShardWriter
from pipeline.model.checkpoints import checkpoints
from pipeline.model.gpt import GPT, ModelConfig
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer
from pipeline.tokenizer.encode import TokenShards
from pipeline.train.data import ValWindows
from pipeline.train.module import OptimSpec, token_loss
from pipeline.train.run import TrainerSpec, TrainSpec, adaptation, train_model

SHAPE = ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, context=16, vocab_size=265)


class Recorder:
    """A stand-in for the stage's MLflow run."""

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_text(self, text, artifact_file):
        pass

    def logged_metrics(self, prefix):
        return {k: v for k, v in self.metrics.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> TokenShards:
    directory = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    index = {"dtype": "uint16", "splits": {}}
    for split, n in (("train", 6_000), ("val", 1_000)):
        tokens = (rng.integers(0, 30, n) * 7 % 256).astype(np.uint16)  # a learnable pattern in a few ids
        writer = ShardWriter(directory, split, np.dtype(np.uint16), 10_000)
        writer.add(tokens, np.array([n]))
        index["splits"][split] = writer.close()
    return TokenShards(directory, index, val_bytes_per_token=1.0)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    byte_tokenizer(SpecialTokens().all()).save(str(path))
    return path


def spec(max_steps: int) -> TrainSpec:
    return TrainSpec(max_steps=max_steps, micro_batch_size=4, eval_every_steps=max_steps, eval_windows=8,
                     log_every_steps=1, ckpt_every_steps=max_steps, optim=OptimSpec(warmup_steps=0))


def run(init, shards, tokenizer_json, directory, steps=3, tracker=None, evaluate_first=False):
    return train_model(init, shards, {"val": shards}, spec(steps), TrainerSpec(accelerator="cpu"), 7, directory,
                       tokenizer_json, None, tracker or Recorder(), evaluate_first=evaluate_first)


def test_the_same_seed_trains_the_same_model(shards, tokenizer_json, tmp_path):
    a, outcome = run(SHAPE, shards, tokenizer_json, tmp_path / "a", steps=10)
    b, _ = run(SHAPE, shards, tokenizer_json, tmp_path / "b", steps=10)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert outcome.metrics["val/loss"] < math.log(SHAPE.vocab_size), "training lowers the loss below chance"
    assert (tmp_path / "a" / "tokenizer.json").is_file(), "a checkpoint directory carries its tokenizer"
    assert [p.name for p in checkpoints(tmp_path / "a")] == ["step-000010.ckpt"]


def test_a_continued_model_starts_from_its_weights_and_a_resume_keeps_its_before(shards, tokenizer_json, tmp_path):
    torch.manual_seed(1)
    init = GPT(SHAPE).eval()
    val = ValWindows(shards.tokens("val"), SHAPE.context, max_windows=8)
    windows = torch.stack([val[i] for i in range(len(val))])
    with torch.no_grad():  # every window is as long, so the mean over all tokens is validation's sum / count
        expected = float(token_loss(init(windows[:, :-1])[0], windows[:, 1:]))
    tracker = Recorder()
    trained, outcome = run(init, shards, tokenizer_json, tmp_path, tracker=tracker, evaluate_first=True)
    assert outcome.before["before/loss"] == pytest.approx(expected, rel=1e-5), "validation before training scores init"
    assert outcome.before["before/loss"] > outcome.metrics["val/loss"]
    assert not torch.equal(trained.tok_emb.weight, init.tok_emb.weight), "init itself is left as it was"

    # The same command again finds the final checkpoint: nothing is re-measured, 'before' comes from the run's log.
    _, again = run(init, shards, tokenizer_json, tmp_path, tracker=tracker, evaluate_first=True)
    assert again.resumed_from and again.before == outcome.before


def test_adaptation_is_the_domain_gain_and_the_forgetting_in_bits_per_byte():
    before = {"before/bpb": 2.0, "before_original/bpb": 1.5}
    after = {"val/bpb": 1.25, "val_original/bpb": 1.75}
    assert adaptation(before, after) == {"cpt/adaptation_gain_bpb": 0.75, "cpt/forgetting_bpb": 0.25}
    assert adaptation({"before/bpb": 2.0}, {"val/bpb": 1.0}) == {"cpt/adaptation_gain_bpb": 1.0}, \
        "without the original corpus there is no forgetting to report"
