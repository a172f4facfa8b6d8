"""The base-vs-tuned report: one row per measure both models have, replies side by side when asked for."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import SftSource
from pipeline.model.gpt import GPT, ModelConfig
from pipeline.sft.examples import build_examples
from pipeline.sft.lora import LoraSpec, add_lora
from pipeline.sft.report import base_vs_tuned, comparison_table
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer

SPECIAL = SpecialTokens()


def test_comparison_has_a_row_per_measure_both_models_have():
    metrics = {"before/loss": 2.0, "val/loss": 1.5, "before_a/loss": 2.25, "val_a/loss": 1.0, "val_b/loss": 3.0,
               "gen/base/rouge_l": 0.1, "gen/sft/rouge_l": 0.4}
    assert comparison_table(metrics, ["a", "b"]).splitlines() == [
        "| measure | base | fine-tuned |", "|---|---:|---:|",
        "| held-out loss (nats/token), all | 2.000 | 1.500 |",
        "| held-out loss, a | 2.250 | 1.000 |",
        "| ROUGE-L F1 | 0.100 | 0.400 |"]  # b has no before/ loss; no exact match was measured


@pytest.fixture(scope="module")
def examples(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    byte_tokenizer(SPECIAL.all()).save(str(path))
    seed = SftSource(format="self_instruct", path=str(data_dir / "instruct" / "self_instruct" / "seed_tasks.jsonl"))
    return build_examples({"seed": seed}, path, 128, SPECIAL, 0, template="chatml", max_tokens=None, val_fraction=0.2,
                          val_max_per_source=8, drop_truncated=False)


@pytest.mark.parametrize("lora", [True, False])
def test_replies_of_both_models_are_scored_and_written(examples, tmp_path, lora):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, context=128,
                            vocab_size=examples.tokenizer.get_vocab_size()))
    tuned = add_lora(model, LoraSpec()) if lora else model
    losses = {"before/loss": 3.0, "val/loss": 2.0}
    report = base_vs_tuned(tuned, None if lora else model, examples, losses, "chatml", SPECIAL, tmp_path,
                           per_source=2, max_new_tokens=3, show=1)
    assert [p.name for p in report.files] == ["generations.md", "comparison.md"]
    assert report.metrics["gen/examples"] == 2 == len(report.table["id"])
    assert {"source", "prompt", "reference", "base", "sft", "base_rouge_l", "sft_exact_match"} <= set(report.table)
    # a fresh adapter computes the base model: the same greedy replies
    assert report.table["base"] == report.table["sft"]
    assert (tmp_path / "comparison.md").read_text() == report.comparison
    assert "| held-out loss (nats/token), all | 3.000 | 2.000 |" in report.comparison
    assert "ROUGE-L F1, seed" in report.comparison

    (tmp_path / "quiet").mkdir()
    quiet = base_vs_tuned(tuned, None, examples, losses, "chatml", SPECIAL, tmp_path / "quiet", per_source=0,
                          max_new_tokens=3, show=1)
    assert quiet.table is None and quiet.metrics == {} and [p.name for p in quiet.files] == ["comparison.md"]
