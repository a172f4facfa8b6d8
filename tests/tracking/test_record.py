"""The run record: energy per stage run, datasets and registered models in MLflow's own terms."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import PROJECT_ROOT
from pipeline.config import compose
from pipeline.contract import StageResult, execute_stage
from pipeline.errors import PipelineError
from pipeline.files import file_hash
from pipeline.model.gpt import load_model
from pipeline.stages import load_stage
from pipeline.tracking.energy import energy_table, lineage, power_source, total
from tests.stages.test_pretrain import TINY_TRAIN
from tests.conftest import tiny_tokenize_overrides


def busy(cfg, ctx) -> StageResult:
    """A stage that works the CPU for a moment and writes one file."""
    (ctx.build_dir / "sum.txt").write_text(str(sum(i * i for i in range(2_000_000))))
    return StageResult(counts={"kept": 1})


TOY = SimpleNamespace(SECTIONS=("seed",), upstream=lambda cfg: [], run=busy)


def test_energy_is_measured_per_stage_run_and_logged(make_cfg, tracking_uri):
    manifest = execute_stage("toy", TOY, make_cfg("tracking.carbon_intensity=100", "tracking.energy_country=FRA"))
    energy = manifest["energy"]
    assert energy["kwh"] > 0 and energy["duration_s"] > 0
    assert energy["co2_kg"] == pytest.approx(energy["kwh"] * 100 / 1000, rel=1e-6), "kWh x the configured g/kWh"
    run = MlflowClient(tracking_uri).get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["energy/kwh"] == pytest.approx(energy["kwh"])
    assert run.data.metrics["energy/co2_kg"] == pytest.approx(energy["co2_kg"])
    assert run.data.tags["energy.power_source"] == energy["power_source"] and "CPU: " in energy["power_source"]
    assert run.data.tags["energy.measured"].startswith("counters" if energy["measured"] else "estimated")
    assert run.data.tags["energy.country"] == "FRA"
    assert "record/seconds" in run.data.metrics


def test_energy_off_never_imports_codecarbon(tmp_path, tracking_uri):
    script = textwrap.dedent(f"""
        import sys, threading
        from types import SimpleNamespace
        from pipeline.config import compose
        from pipeline.contract import execute_stage
        from tests.tracking.test_record import busy
        cfg = compose("paths.outputs_dir={tmp_path}", "tracking.uri={tracking_uri}", "tracking.experiment=energy-off",
                      "tracking.energy=false")
        manifest = execute_stage("toy", SimpleNamespace(SECTIONS=("seed",), upstream=lambda c: [], run=busy), cfg)
        print(manifest["energy"], "codecarbon" in sys.modules, threading.active_count())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    energy, imported, _ = out.stdout.split()[-3:]
    assert energy == "None" and imported == "False"
    run = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("energy-off").experiment_id])[0]
    assert not any(k.startswith("energy") for k in (*run.data.metrics, *run.data.tags))


def test_bad_energy_settings_are_named():
    with pytest.raises(PipelineError, match="tracking.energy_country.*three-letter"):
        compose("tracking.energy_country=France")
    with pytest.raises(PipelineError, match="tracking.carbon_intensity"):
        compose("tracking.carbon_intensity=-5")


def test_power_source_says_what_was_estimated():
    cpu = type("CPU", (), {"_mode": "cpu_load"})()
    ram = type("RAM", (), {})()
    assert power_source([ram, cpu]) == ("RAM: estimate from its size; CPU: TDP x load estimate (no power counters)", False)
    cpu._mode = "intel_rapl"
    assert power_source([cpu]) == ("CPU: RAPL counters", True)


@pytest.mark.slow
def test_pretrain_logs_datasets_and_registers_a_model_that_loads_back(tokenized, tracking_uri, experiment, data_dir):
    import mlflow.transformers

    from pipeline.tracking.lineage import fluent_store

    cfg = compose(f"paths.outputs_dir={tokenized}", f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}",
                  *tiny_tokenize_overrides(data_dir), "tokenizer.vocab_size=512", *TINY_TRAIN,
                  "pretrain.max_steps=10", "pretrain.eval_every_steps=10", "pretrain.ckpt_every_steps=10",
                  "pretrain.sample_every_steps=10", "tracking.models=true")
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    manifest = execute_stage("pretrain", load_stage("pretrain"), cfg, out_dir=tokenized / "demo" / f"pretrain-{experiment}")
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before, "logging the model leaves the process's store alone"
    out = Path(tokenized / "demo" / f"pretrain-{experiment}")
    client = MlflowClient(tracking_uri)
    run = client.get_run(manifest["mlflow_run_id"])

    # Datasets: tokenize's output read (its manifest's hash, as this manifest records it), this run's output.
    datasets = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset
                for d in run.inputs.dataset_inputs}
    tokenize = datasets[("tokenize", "input")]
    assert tokenize.digest == manifest["inputs"]["tokenize"]["manifest_sha256"][:16]
    tok_manifest = json.loads((tokenized / "demo" / "tokenize" / "manifest.json").read_text())
    assert json.loads(tokenize.profile)["train_tokens"] == tok_manifest["counts"]["train"]["tokens"]
    assert json.loads(tokenize.source)["uri"] == (tokenized / "demo" / "tokenize").resolve().as_uri()
    own = datasets[("pretrain", "output")]
    assert own.digest == file_hash(out / "manifest.json")[:16], "the digest a downstream stage will record"
    assert json.loads(own.profile)["parameters"] == manifest["metrics"]["model/params"]
    producer = client.get_run(tok_manifest["mlflow_run_id"])  # the same dataset, on the run that wrote it
    assert {(d.dataset.name, d.dataset.digest) for d in producer.inputs.dataset_inputs} >= {("tokenize", tokenize.digest)}

    # The registered model: one name per experiment, alias = stage; it loads back with model.pt's logits.
    registered = manifest["registered_model"]
    assert registered["name"] == experiment and registered["alias"] == "pretrain"
    version = client.get_model_version_by_alias(experiment, "pretrain")
    assert str(version.version) == registered["version"] and version.run_id == run.info.run_id
    with fluent_store(tracking_uri, run.info.experiment_id):
        loaded = mlflow.transformers.load_model(f"models:/{experiment}@pretrain", return_type="components")
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded["model"].eval()(ids).logits, load_model(out).eval()(ids)[0], atol=1e-5)
    assert loaded["tokenizer"]("To be").input_ids, "the tokenizer travels with the model"

    # A sweep's job (a run with a parent) registers nothing: the alias stays on the published stage's version.
    job = execute_stage("pretrain", load_stage("pretrain"), cfg, out_dir=tokenized / "demo" / f"job-{experiment}",
                        parent_run_id=run.info.run_id)
    assert "registered_model" not in job
    assert [v.version for v in client.search_model_versions(f"name='{experiment}'")] == [version.version]

    # Energy of the lineage: tokenize then pretrain, summed.
    stages = lineage({"pretrain": manifest})
    assert [m["stage"] for m in stages] == ["tokenize", "pretrain"]
    spent = total([m["energy"] for m in stages])
    assert spent["kwh"] == pytest.approx(manifest["energy"]["kwh"] + tok_manifest["energy"]["kwh"])
    table = energy_table(stages)
    assert "| tokenize |" in table and "| pretrain |" in table and "**total** (2 runs)" in table


def test_files_a_stage_config_names_are_datasets_whose_digest_follows_the_files(tmp_path):
    from pipeline.tracking.lineage import file_input, named_paths

    (tmp_path / "crawl").mkdir()
    (tmp_path / "crawl" / "a.warc.gz").write_bytes(b"x" * 10)
    config = {"filter": {"sources": {"warc": {"path": str(tmp_path / "crawl" / "*.warc.gz"), "license": "CC0-1.0"},
                                     "web": {"stage": "dedup", "path": None}},
                         "head": {"train_path": str(tmp_path / "crawl"), "epochs": 3}}}
    assert named_paths(config) == {"filter.sources.warc": (str(tmp_path / "crawl" / "*.warc.gz"), "CC0-1.0"),
                                   "filter.head.train_path": (str(tmp_path / "crawl"), None)}
    first = file_input("filter.sources.warc", *named_paths(config)["filter.sources.warc"])
    assert json.loads(first.dataset.profile) == {"files": 1, "bytes": 10, "license": "CC0-1.0"}
    assert [t.value for t in first.tags] == ["input"]
    (tmp_path / "crawl" / "b.warc.gz").write_bytes(b"y")
    second = file_input("filter.sources.warc", *named_paths(config)["filter.sources.warc"])
    assert json.loads(second.dataset.profile)["files"] == 2 and second.dataset.digest != first.dataset.digest
    again = file_input("filter.sources.warc", *named_paths(config)["filter.sources.warc"])
    assert again.dataset.digest == second.dataset.digest, "the same files give the same digest"
