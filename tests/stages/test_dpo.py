"""dpo and merge end to end: the real preference pairs, a real MLflow store, Lightning training of a tiny model.

The SFT model is a stage-style directory (model.pt, tokenizer.json and the chat template), given as
dpo.init.path, so no earlier stage has to run.
"""
from __future__ import annotations

import gzip
import itertools
import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline import PROJECT_ROOT
from pipeline.config import compose
from pipeline.contract import execute_stage
from pipeline.errors import PipelineError
from pipeline.model.gpt import GPT, ModelConfig, load_model, save_model
from pipeline.sft.chat import get_template
from pipeline.stages import load_stage
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer
from tests.conftest import mlflow_runs, sigterm_at


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sft")
    tokenizer = byte_tokenizer(SpecialTokens().all())
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "chat_template.jinja").write_text(get_template("chatml").source)
    torch.manual_seed(0)
    save_model(GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, context=256,
                               vocab_size=tokenizer.get_vocab_size())), directory / "model.pt")
    return directory


@pytest.fixture(scope="module")
def hh_head(tmp_path_factory, data_dir) -> Path:
    """The first 400 HH-RLHF records (tests/dpo/test_pairs.py reads the whole file): a stage run reads less."""
    path = tmp_path_factory.mktemp("hh") / "hh.jsonl.gz"
    with gzip.open(data_dir / "preference" / "hh_rlhf" / "harmless-base-test.jsonl.gz", "rt") as src, \
            gzip.open(path, "wt") as dst:
        dst.writelines(itertools.islice(src, 400))
    return path


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "mine.jsonl"
    records = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},
               {"chosen": "\n\nHuman: hi\n\nAssistant: hello"},
               {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: no"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def overrides(sft_dir: Path, hh: Path, bad_file: Path, outputs: Path, tracking_uri: str, experiment: str,
              data_dir: Path, *extra: str) -> list[str]:
    return [f"paths.outputs_dir={outputs}", f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}",
            f"paths.data_dir={data_dir}", "dpo.init.stage=null", f"dpo.init.path={sft_dir}",
            f"dpo.sources.hh.path={hh}",
            "~dpo.sources.oasst", f"+dpo.sources.mine={{format: hh_rlhf, path: {bad_file}}}",
            "dpo.val_fraction=0.2", "dpo.val_max_per_source=16", "dpo.max_steps=8", "dpo.micro_batch_size=4",
            "dpo.eval_every_steps=4", "dpo.log_every_steps=2", "dpo.ckpt_every_steps=4", "dpo.optim.warmup_steps=1",
            "dpo.optim.lr=1e-2", "dpo.beta=0.5", "dpo.generate.per_source=2", "dpo.generate.max_new_tokens=4", *extra]


def test_dpo_trains_tracks_reports_and_merges(sft_dir, hh_head, bad_file, tmp_path, tracking_uri, experiment, data_dir):
    cfg = compose(*overrides(sft_dir, hh_head, bad_file, tmp_path / "outputs", tracking_uri, experiment, data_dir))
    manifest = execute_stage("dpo", load_stage("dpo"), cfg)
    out = tmp_path / "outputs" / "demo" / "dpo"
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.info.status == "FINISHED"
    m = run.data.metrics

    # bad pairs are counted by name; pairs longer than the window are counted and left out
    pairs = manifest["counts"]["pairs"]
    assert pairs["mine"]["bad"] == {"identical_replies": 1, "missing_rejected": 1} and pairs["mine"]["read"] == 1
    assert pairs["hh"]["train"]["dropped_too_long"] > 0 and m["data/hh/dropped_too_long"] > 0
    assert manifest["outputs"]["base"] == {"stage": None, "path": str(sft_dir)}

    # before training the policy is the reference; after, the held-out pairs moved towards the chosen replies
    assert m["before/loss"] == pytest.approx(math.log(2), abs=1e-6) and m["before/kl"] == pytest.approx(0, abs=1e-6)
    assert m["before_hh/reward_accuracy"] == 0.0
    assert m["val/kl"] > 0 and m["val/reward_margin"] > 0 and m["val/reward_accuracy"] > 0
    for key in ("train/loss", "train/reward_accuracy", "train/reward_margin", "train/tokens_per_s",
                "val_hh/ranking_accuracy", "before_hh/ranking_accuracy", "val_hh/chosen_logp", "dpo/trainable_params"):
        assert key in m, key
    comparison = (out / "comparison.md").read_text()
    assert "| all | reward accuracy (chosen higher implicit reward) | 0.000 |" in comparison
    assert "| id | prompt (last user turn) | chosen | rejected | SFT | DPO |" in comparison
    client = MlflowClient(tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "comparison.md", "bad_records.json"} <= artifacts

    # merge folds the adapter into the SFT model (merge checks the logits against the adapter model's)
    sft = load_model(sft_dir)
    merged_manifest = execute_stage("merge", load_stage("merge"), compose(
        *overrides(sft_dir, hh_head, bad_file, tmp_path / "outputs", tracking_uri, experiment, data_dir), "merge.adapter=dpo"))
    assert merged_manifest["inputs"].keys() == {"dpo"} and merged_manifest["metrics"]["merge/max_logit_diff"] < 1e-4
    merged = load_model(tmp_path / "outputs" / "demo" / "merge")
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(merged(ids)[0], sft(ids)[0]), "the DPO adapter changed the model"


def test_bad_dpo_configs_and_inputs_are_named(sft_dir, hh_head, bad_file, tmp_path, tracking_uri, experiment, data_dir):
    args = overrides(sft_dir, hh_head, bad_file, tmp_path / "outputs", tracking_uri, experiment, data_dir)
    with pytest.raises(PipelineError, match=r"config key 'dpo.beta' is 0.0; it must be positive"):
        compose(*args, "dpo.beta=0")
    with pytest.raises(ConfigCompositionException, match=r"dpo.loss=kto"):  # the schema's enum, at composition
        compose(*args, "dpo.loss=kto")
    with pytest.raises(PipelineError, match=r"config key 'dpo.label_smoothing' is 0.1; it must be 0 with loss ipo"):
        compose(*args, "dpo.loss=ipo", "dpo.label_smoothing=0.1")
    no_template = tmp_path / "base"
    no_template.mkdir()
    for name in ("model.pt", "tokenizer.json"):
        (no_template / name).symlink_to(sft_dir / name)
    with pytest.raises(PipelineError, match=r"dpo.init: .*base has no chat_template.jinja; dpo tunes an "
                                            r"instruction-tuned model"):
        execute_stage("dpo", load_stage("dpo"), compose(*args, f"dpo.init.path={no_template}"))


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "dpo", *args], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_uninterrupted_adapter(sft_dir, hh_head, bad_file, tmp_path, tracking_uri, data_dir):
    steps = ["dpo.max_steps=12", "dpo.ckpt_every_steps=3", "dpo.eval_every_steps=12", "dpo.generate.per_source=0"]
    runs = {name: (f"{name}-{uuid.uuid4().hex[:6]}",) for name in ("straight", "killed")}
    runs = {name: (e, overrides(sft_dir, hh_head, bad_file, tmp_path / name, tracking_uri, e, data_dir, *steps))
            for name, (e,) in runs.items()}
    execute_stage("dpo", load_stage("dpo"), compose(*runs["straight"][1]))

    proc = _cli(*runs["killed"][1])
    ckpt_dir = tmp_path / "killed" / "demo" / "dpo.ckpt"
    out = sigterm_at(proc, ckpt_dir / "step-000003.ckpt")
    assert "run the same command again to resume" in out, out[-2000:]
    (killed,) = mlflow_runs(tracking_uri, runs["killed"][0])
    assert killed.info.status == "KILLED"

    proc = _cli(*runs["killed"][1])
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    (first,) = mlflow_runs(tracking_uri, runs["killed"][0])
    assert f"resuming MLflow run {first.info.run_id}" in out and first.info.status == "FINISHED"
    (reference,) = mlflow_runs(tracking_uri, runs["straight"][0])
    for key in ("val/loss", "val/reward_margin", "val/kl", "before/ranking_accuracy"):
        assert first.data.metrics[key] == pytest.approx(reference.data.metrics[key], rel=1e-5), key
    ours, theirs = (load_file(tmp_path / name / "demo" / "dpo" / "adapter" / "adapter_model.safetensors")
                    for name in ("killed", "straight"))
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_an_adapter_whose_base_was_rebuilt_is_refused_down_the_chain(tmp_path):
    """dpo's adapter sits on sft's output, itself an adapter on cpt: each link checks the manifest it read."""
    from pipeline.files import file_hash
    from pipeline.model.io import adapter_base

    cpt, sft = tmp_path / "cpt", tmp_path / "sft"
    cpt.mkdir()
    sft.mkdir()
    (cpt / "manifest.json").write_text(json.dumps({"stage": "cpt", "outputs": {}}))
    (sft / "manifest.json").write_text(json.dumps({
        "stage": "sft", "outputs": {"base": {"stage": "cpt", "path": str(cpt)}},
        "inputs": {"cpt": {"manifest_sha256": file_hash(cpt / "manifest.json")}}}))
    assert adapter_base(sft, {}) == cpt
    (cpt / "manifest.json").write_text(json.dumps({"stage": "cpt", "outputs": {}, "rebuilt": True}))
    with pytest.raises(PipelineError, match="cpt was rebuilt after sft trained its adapter on it: run 'make sft'"):
        adapter_base(sft, {})
