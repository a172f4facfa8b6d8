"""The demo preset end to end, shrunk to a tiny model and a few steps: filter to evaluate in one tmp_path."""
from __future__ import annotations

import json

import pytest

from pipeline.contract import execute_stage
from pipeline.stages import STAGES, load_stage
from tests.conftest import mlflow_runs, tiny_filter_overrides

CHAIN = ["filter", "dedup", "tokenize", "pretrain", "cpt", "sft", "dpo", "merge", "evaluate"]  # what `make all` runs

TINY = [
    # the crawl through the filter and dedup stages, as the demo reads it, but fewer pages
    *tiny_filter_overrides(), "tokenize.sources.web.stage=dedup", "tokenize.sources.web.path=null",
    "dedup.eval.enabled=false",
    # a tiny model, a few steps each
    "model=tiny", "pretrain.max_steps=8", "pretrain.micro_batch_size=4", "pretrain.eval_every_steps=4",
    "pretrain.eval_windows=8", "pretrain.sample_every_steps=0", "pretrain.sample_tokens=4",
    "pretrain.optim.warmup_steps=2",
    "cpt.max_steps=4", "cpt.micro_batch_size=4", "cpt.eval_every_steps=2", "cpt.eval_windows=8",
    "cpt.optim.warmup_steps=1", "++cpt.sources.peps.max_documents=60",
    "~sft.sources.p3", "~sft.sources.gsm8k", "~sft.sources.codealpaca",
    "sft.max_steps=4", "sft.micro_batch_size=4", "sft.eval_every_steps=2", "sft.optim.warmup_steps=1",
    "sft.val_max_per_source=8", "sft.generate.per_source=1", "sft.generate.max_new_tokens=4",
    "dpo.max_steps=2", "dpo.micro_batch_size=4", "dpo.eval_every_steps=2", "dpo.optim.warmup_steps=1",
    "dpo.val_max_per_source=8", "dpo.generate.per_source=1", "dpo.generate.max_new_tokens=4",
    "evaluate.sets.corpus.max_documents=10", "evaluate.sets.domain.max_documents=10",
    "evaluate.tasks.sst2.limit=8", "evaluate.tasks.sst2.shots=[0]", "evaluate.tasks.piqa.limit=8",
    "evaluate.harness.limit=6", "evaluate.summarize.limit=2", "evaluate.summarize.max_new_tokens=4",
    "evaluate.bias.limit=12", "evaluate.head.train_limit=24", "evaluate.head.eval_limit=8", "evaluate.head.epochs=2",
    "evaluate.head.lora_steps=2",
]
CHECKS = {"harness": "harness/{}/sst2/accuracy", "summarize": "summarize/{}/greedy/rouge1",
          "bias": "bias/{}/pct_stereotype", "head": "head/{}/frozen/dev_accuracy"}


@pytest.mark.slow
def test_the_demo_runs_from_filter_to_evaluate(make_cfg, tracking_uri, experiment, tmp_path):
    assert [s for s in STAGES if s != "scaling"] == CHAIN, "make all runs every stage but scaling, in this order"
    cfg = make_cfg(*TINY)
    manifests = {}
    for stage in CHAIN:
        manifests[stage] = execute_stage(stage, load_stage(stage), cfg)
        on_disk = json.loads((tmp_path / "outputs" / "demo" / stage / "manifest.json").read_text())
        assert on_disk == manifests[stage] and on_disk["stage"] == stage
        for name, upstream in on_disk["inputs"].items():  # each stage read what the one before it published
            assert upstream["mlflow_run_id"] == manifests[name]["mlflow_run_id"], (stage, name)

    filtered, deduped = manifests["filter"]["counts"], manifests["dedup"]["counts"]
    assert filtered["kept"] + filtered["rejected"] == filtered["input"] > 0
    assert deduped["input"] == filtered["kept"] and deduped["kept"] + deduped["removed"] == deduped["input"]
    assert manifests["tokenize"]["counts"]["per_source"]["web"]["train"]["documents"] > 0
    evaluated = manifests["evaluate"]
    assert set(evaluated["counts"]["parameters"]) == {"pretrain", "cpt", "sft", "dpo"}
    for model in ("pretrain", "cpt", "sft", "dpo"):  # every check ran on every model (the harness: those with hf/)
        for check, metric in CHECKS.items():
            assert (metric.format(model) in evaluated["metrics"]) == (check != "harness" or model != "dpo"), \
                (model, check)
            assert evaluated["metrics"][f"seconds/{model}/{check}"] >= 0
    m = evaluated["metrics"]
    assert m["bias/pretrain/n"] + m["bias/pretrain/skipped"] == 12, "pairs longer than the 64-token context are counted"
    assert m["head/pretrain/n_train"] == 24
    report = (tmp_path / "outputs" / "demo" / "evaluate" / "results.md").read_text()
    assert "All 9 comparisons agree" in report and "Not compared: dpo (no transformers export)" in report

    runs = mlflow_runs(tracking_uri, experiment)
    assert sorted((r.data.tags["stage"], r.info.status) for r in runs) == sorted((s, "FINISHED") for s in CHAIN)
    for run in runs:
        stage = run.data.tags["stage"]
        assert run.info.run_id == manifests[stage]["mlflow_run_id"]
        assert run.data.tags["config_hash"] == manifests[stage]["config_hash"]
