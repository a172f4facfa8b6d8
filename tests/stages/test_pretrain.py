"""pretrain and cpt end to end on real data with a tiny model: metrics, checkpoints, export, kill and resume."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import PROJECT_ROOT
from pipeline.config import compose
from pipeline.contract import StageResult, execute_stage, write_manifest
from pipeline.errors import PipelineError
from pipeline.model.gpt import load_model
from pipeline.stages import load_stage
from tests.conftest import mlflow_runs, sigterm_at, tiny_tokenize_overrides

TINY_TRAIN = ["model=tiny", "pretrain.max_steps=30", "pretrain.micro_batch_size=8", "pretrain.eval_every_steps=10",
              "pretrain.eval_windows=20", "pretrain.log_every_steps=5", "pretrain.ckpt_every_steps=10",
              "pretrain.sample_every_steps=10", "pretrain.sample_tokens=8", "pretrain.optim.warmup_steps=5",
              "cpt.max_steps=20", "cpt.micro_batch_size=8", "cpt.eval_every_steps=10", "cpt.eval_windows=20",
              "cpt.log_every_steps=5", "cpt.ckpt_every_steps=10", "cpt.optim.warmup_steps=5",
              "++cpt.sources.peps.max_documents=120"]


@pytest.fixture(scope="module")
def outputs(tokenized) -> Path:
    """The session's tokenize output, shared by this module's tests (each test writes later stages into a copy or its
    own name)."""
    return tokenized


def _overrides(outputs: Path, tracking_uri: str, experiment: str, data_dir: Path, *extra: str) -> list[str]:
    return [f"paths.outputs_dir={outputs}", f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}",
            *tiny_tokenize_overrides(data_dir), "tokenizer.vocab_size=512", *TINY_TRAIN, *extra]


def _compose(outputs, tracking_uri, experiment, data_dir, *extra):
    return compose(*_overrides(outputs, tracking_uri, experiment, data_dir, *extra))


def _history(tracking_uri, run_id, key) -> dict[int, float]:
    return {m.step: m.value for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)}


def test_pretrain_trains_tracks_checkpoints_and_exports(outputs, tracking_uri, experiment, data_dir):
    cfg = _compose(outputs, tracking_uri, experiment, data_dir)
    manifest = execute_stage("pretrain", load_stage("pretrain"), cfg)
    out = outputs / "demo" / "pretrain"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "hf", "manifest.json", "model.pt", "tokenizer.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000020.ckpt", "step-000030.ckpt"]
    assert not (outputs / "demo" / "pretrain.ckpt").exists(), "the resume state goes once the stage has finished"

    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.info.status == "FINISHED" and run.info.run_id == manifest["mlflow_run_id"]
    m = run.data.metrics
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/tokens_per_s", "train/mfu",
                "val/loss", "val/ppl", "val/bpb", "model/non_embedding_params", "train/flops"):
        assert key in m and math.isfinite(m[key]), key
    tok = json.loads((outputs / "demo" / "tokenize" / "manifest.json").read_text())
    assert m["val/bpb"] == pytest.approx(m["val/loss"] / math.log(2) / tok["metrics"]["tokenize/val_bytes_per_token"])
    assert m["train/tokens"] == 30 * 8 * 64 and m["train/flops"] == 6 * m["model/non_embedding_params"] * m["train/tokens"]
    assert 0.05e6 < m["model/non_embedding_params"] < 0.15e6, "the tiny preset is about 0.1M parameters"
    val = _history(tracking_uri, run.info.run_id, "val/loss")
    assert sorted(val) == [10, 20, 30] and val[30] < val[10] < math.log(512), "validation loss falls during training"
    lr = _history(tracking_uri, run.info.run_id, "train/lr")
    assert lr[5] == pytest.approx(1e-3) and lr[30] == pytest.approx(1e-4), "warmup to the peak, cosine to 10%"
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step-000010.txt", "samples/step-000030.txt"} <= artifacts

    # The published weights, the last checkpoint and the transformers export are one model.
    from transformers import AutoModelForCausalLM

    model = load_model(out).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 20))
    ours = model(ids)[0]
    assert torch.allclose(load_model(out / "checkpoints" / "step-000030.ckpt").eval()(ids)[0], ours)
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours, atol=1e-5)


def test_cpt_reports_adaptation_and_forgetting(outputs, tracking_uri, experiment, data_dir):
    cfg = _compose(outputs, tracking_uri, experiment, data_dir)
    if not (outputs / "demo" / "pretrain" / "manifest.json").exists():
        execute_stage("pretrain", load_stage("pretrain"), cfg)
    manifest = execute_stage("cpt", load_stage("cpt"), cfg)
    m = manifest["metrics"]
    assert manifest["counts"]["domain"]["train"]["documents"] > 50 and manifest["counts"]["domain"]["val"]["tokens"]
    assert m["cpt/adaptation_gain_bpb"] == pytest.approx(m["before/bpb"] - m["val/bpb"])
    assert m["cpt/adaptation_gain_bpb"] > 0, "training on the domain lowers the domain's loss"
    assert m["cpt/forgetting_bpb"] == pytest.approx(m["val_original/bpb"] - m["before_original/bpb"])
    pre = json.loads((outputs / "demo" / "pretrain" / "manifest.json").read_text())
    assert m["before_original/loss"] == pytest.approx(pre["metrics"]["val/loss"], rel=1e-4), \
        "before training, cpt's model is the pretrained one"
    run = MlflowClient(tracking_uri).get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["upstream.pretrain.run_id"] == pre["mlflow_run_id"]
    lr = _history(tracking_uri, run.info.run_id, "train/lr")
    assert lr[5] == pytest.approx(5e-4), "the learning rate is re-warmed to cpt's own peak"

    # Starting from the transformers export instead gives the same starting point.
    cfg = _compose(outputs, tracking_uri, experiment, data_dir, "cpt.init.stage=null",
                   f"cpt.init.path={outputs / 'demo' / 'pretrain' / 'hf'}", "cpt.max_steps=1", "cpt.export=false")
    again = execute_stage("cpt", load_stage("cpt"), cfg)
    assert again["metrics"]["before/loss"] == pytest.approx(m["before/loss"], rel=1e-5)


def test_cpt_config_hash_covers_the_tokenize_and_tokenizer_keys_it_reads(make_cfg, tmp_path):
    """cpt encodes its domain with tokenize.* and ends documents with tokenizer.special_tokens.eos: changing
    either gives another config hash (so Make and the contract rebuild cpt); a key it does not read does not."""
    for stage in ("tokenize", "pretrain"):  # finished upstream stages, as read_upstream sees them
        (tmp_path / "outputs" / "demo" / stage).mkdir(parents=True)
        write_manifest(tmp_path / "outputs" / "demo" / stage, {"stage": stage, "mlflow_run_id": None})
    cpt = load_stage("cpt")
    hashed_only = SimpleNamespace(SECTIONS=cpt.SECTIONS, RUNTIME=cpt.RUNTIME, upstream=cpt.upstream, run=lambda cfg, ctx: StageResult())

    def config_hash(*overrides: str) -> str:
        return execute_stage("cpt", hashed_only, make_cfg(*overrides))["config_hash"]

    base = config_hash()
    assert config_hash("sft.max_steps=7") == base, "a section cpt does not read leaves its hash alone"
    assert config_hash("trainer.devices=2") == base, "how it runs (RUNTIME) is not what it computes"
    for override in ("tokenizer.special_tokens.eos='<eot>'", "tokenize.max_shard_tokens=1000",
                     "tokenize.batch_size=7", "cpt.max_steps=3"):
        assert config_hash(override) != base, override


def _transformers_nll(directory: Path, texts: list[str], context: int, stride: int) -> tuple[float, int]:
    """Summed NLL and token count of ``texts`` under the exported model, with transformers' own model and
    tokenizer: each document after its EOS, windows scoring ``stride`` new tokens from ``context`` inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    nll, tokens = 0.0, 0
    for text in texts:
        seq = torch.tensor([tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]])
        scored_to = 1
        while scored_to < len(seq):
            end = min(len(seq), context + 1 if scored_to == 1 else scored_to + stride)
            begin = max(0, end - 1 - context)
            labels = seq[begin + 1:end].clone()
            labels[:scored_to - begin - 1] = -100
            with torch.no_grad():
                logits = model(input_ids=seq[None, begin:end - 1]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            tokens += int((labels != -100).sum())
            scored_to = end
    return nll, tokens


def test_evaluate_matches_transformers_and_breaks_down_by_source(outputs, tracking_uri, experiment, data_dir):
    cfg = _compose(outputs, tracking_uri, experiment, data_dir)
    if not (outputs / "demo" / "pretrain" / "manifest.json").exists():
        execute_stage("pretrain", load_stage("pretrain"), cfg)
    pre = json.loads((outputs / "demo" / "pretrain" / "manifest.json").read_text())
    hf = outputs / "demo" / "pretrain" / "hf"
    cfg = _compose(outputs, tracking_uri, experiment, data_dir, "~evaluate.models.cpt", "~evaluate.models.sft",
                   "~evaluate.models.dpo",
                   "~evaluate.sets.domain",
                   f"+evaluate.models.exported.path={hf}", "evaluate.sets.corpus.max_documents=40",
                   f"+evaluate.models.last_ckpt.path={outputs / 'demo' / 'pretrain' / 'checkpoints' / 'step-000030.ckpt'}",
                   f"+evaluate.sets.peps.path={data_dir}/domain/python_peps/peps.jsonl.gz",
                   "+evaluate.sets.peps.max_documents=3", "evaluate.stride=24", "evaluate.tasks.sst2.limit=24",
                   "evaluate.tasks.sst2.shots=[0,1]", "evaluate.tasks.piqa.limit=10",
                   *(f"evaluate.{check}.enabled=false" for check in ("harness", "summarize", "bias", "head")))
    manifest = execute_stage("evaluate", load_stage("evaluate"), cfg)
    m = manifest["metrics"]
    rows = json.loads((outputs / "demo" / "evaluate" / "results.json").read_text())
    total = {(r["model"], r["set"]): r for r in rows if r["source"] == "all"}
    assert set(total) == {(model, s) for model in ("pretrain", "exported", "last_ckpt") for s in ("corpus", "peps")}

    # The stage's perplexity equals transformers' on the exported model, tokenizer included.
    texts = pq.read_table(outputs / "demo" / "tokenize" / "val.parquet").column("text").to_pylist()[:40]
    nll, tokens = _transformers_nll(hf, [t for t in texts if t.strip()], context=64, stride=24)
    assert total["pretrain", "corpus"]["tokens"] == tokens
    assert m["eval/pretrain/corpus/ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert m["eval/exported/corpus/ppl"] == pytest.approx(m["eval/pretrain/corpus/ppl"], rel=1e-4), \
        "the transformers directory evaluates like the checkpoint it was exported from"
    assert m["eval/last_ckpt/peps/bpb"] == pytest.approx(m["eval/pretrain/peps/bpb"], rel=1e-6), \
        "the last Lightning checkpoint holds the published weights"

    # Bits per byte: the summed loss over the documents' UTF-8 bytes; the sources add up to the set.
    corpus = total["pretrain", "corpus"]
    assert corpus["bytes"] == sum(len(t.encode()) for t in texts if t.strip())
    assert corpus["bpb"] == pytest.approx(corpus["loss"] * corpus["tokens"] / math.log(2) / corpus["bytes"])
    parts = [r for r in rows if r["model"] == "pretrain" and r["set"] == "corpus" and r["source"] != "all"]
    assert {r["source"] for r in parts} == {"shakespeare", "web"}
    assert sum(r["tokens"] for r in parts) == corpus["tokens"] and sum(r["bytes"] for r in parts) == corpus["bytes"]
    assert m["eval/pretrain/corpus/shakespeare/bpb"] < m["eval/pretrain/peps/bpb"], \
        "the model trained on shakespeare and web pages knows shakespeare better than Python PEPs"

    # Prompting: every model on every task and number of shots, baselines beside; the exported model
    # is the same function, so it answers the same.
    for shots in (0, 1):
        accuracy = m[f"prompt/pretrain/sst2/{shots}shot/accuracy"]
        assert 0 <= accuracy <= 1 and m[f"prompt/exported/sst2/{shots}shot/accuracy"] == accuracy
    dev = [line.rsplit("\t", 1)[1].strip() for line in (data_dir / "eval/sst2/dev.tsv").read_text().splitlines()[:24]]
    assert m["prompt/sst2/random_baseline"] == 0.5
    assert m["prompt/sst2/majority_baseline"] == pytest.approx(dev.count("1") / 24), "train's majority is positive"
    assert manifest["counts"]["prompting"]["pretrain/sst2/1shot"] == 24
    assert 0 < manifest["counts"]["prompting"]["pretrain/piqa/0shot"] <= 10, \
        "PIQA answers too long for 64 tokens are left out"
    report = (outputs / "demo" / "evaluate" / "results.md").read_text()
    assert "## prompting accuracy" in report and "| true \\ predicted | negative | positive |" in report

    run = MlflowClient(tracking_uri).get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["evaluated.pretrain.run_id"] == pre["mlflow_run_id"]
    assert run.data.tags["evaluated.exported.path"] == str(hf.resolve())
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run.info.run_id)}
    assert {"results.md", "results.json"} <= artifacts


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(outputs, tracking_uri, experiment, data_dir):
    cfg = _compose(outputs, tracking_uri, experiment, data_dir, "pretrain.optim.lr=1e30", "pretrain.grad_clip=0",
                   "pretrain.optim.warmup_steps=0", "pretrain.ckpt_every_steps=1", "pretrain.sample_every_steps=0")
    with pytest.raises(PipelineError, match=r"the training loss is nan at step \d+; the last good checkpoint is "):
        execute_stage("pretrain", load_stage("pretrain"), cfg, out_dir=outputs / "nan" / "pretrain")
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.info.status == "FAILED"


def _cli(outputs, tracking_uri, experiment, data_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "pretrain",
                             *_overrides(outputs, tracking_uri, experiment, data_dir, *extra)],
                            cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_uninterrupted_losses(outputs, tracking_uri, data_dir, tmp_path):
    steps = ["pretrain.max_steps=60", "pretrain.ckpt_every_steps=10", "pretrain.eval_every_steps=30",
             "pretrain.log_every_steps=1", "pretrain.sample_every_steps=0", "pretrain.export=false"]
    straight = f"straight-{uuid.uuid4().hex[:6]}"
    (tmp_path / "straight" / "demo").mkdir(parents=True)  # both runs read the shared tokenize output
    os.symlink(outputs / "demo" / "tokenize", tmp_path / "straight" / "demo" / "tokenize")
    # The reference needs no process of its own: the same stage in this one (the killed run and its resume are CLI).
    execute_stage("pretrain", load_stage("pretrain"),
                  _compose(outputs, tracking_uri, straight, data_dir, *steps, f"paths.outputs_dir={tmp_path / 'straight'}"))

    killed = f"killed-{uuid.uuid4().hex[:6]}"
    (tmp_path / "killed" / "demo").mkdir(parents=True)
    os.symlink(outputs / "demo" / "tokenize", tmp_path / "killed" / "demo" / "tokenize")
    args = (outputs, tracking_uri, killed, data_dir, *steps, f"paths.outputs_dir={tmp_path / 'killed'}")
    proc = _cli(*args)
    ckpt_dir = tmp_path / "killed" / "demo" / "pretrain.ckpt"
    out = sigterm_at(proc, ckpt_dir / "step-000020.ckpt")
    saved = sorted(p.name for p in ckpt_dir.glob("step-*.ckpt"))
    stopped_at = int(saved[-1][5:11])
    assert 20 <= stopped_at < 60, f"the kill should land mid-run, checkpoints: {saved}"
    assert "run the same command again to resume" in out
    (first,) = mlflow_runs(tracking_uri, killed)
    assert first.info.status == "KILLED"
    assert not (tmp_path / "killed" / "demo" / "pretrain" / "manifest.json").exists()
    assert first.data.metrics["energy/kwh"] > 0, "a killed execution logs the energy it measured"

    proc = _cli(*args)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming MLflow run {first.info.run_id}" in out
    (run,) = mlflow_runs(tracking_uri, killed)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    (reference,) = mlflow_runs(tracking_uri, straight)
    ours, theirs = (_history(tracking_uri, r.info.run_id, "train/loss") for r in (run, reference))
    assert stopped_at < 40 and set(ours) >= set(range(1, 61))
    for step in (stopped_at + 1, 40, 60):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-6), step
    assert run.data.metrics["val/loss"] == pytest.approx(reference.data.metrics["val/loss"], rel=1e-5)
    energy = json.loads((tmp_path / "killed" / "demo" / "pretrain" / "manifest.json").read_text())["energy"]
    assert energy["kwh"] > first.data.metrics["energy/kwh"] and run.data.metrics["energy/kwh"] == \
        pytest.approx(energy["kwh"]), "the resumed run's energy adds the killed execution's"
    assert energy["duration_s"] > first.data.metrics["energy/duration_s"]


@pytest.mark.slow
def test_two_process_ddp_on_cpu_agrees_with_one_process(outputs, tracking_uri, data_dir, tmp_path):
    common = ["pretrain.max_steps=2", "pretrain.log_every_steps=1", "pretrain.sample_every_steps=0",
              "pretrain.export=false", "pretrain.optim.warmup_steps=0", "trainer.accelerator=cpu"]
    results = {}
    for name, extra in {"single": ["pretrain.micro_batch_size=8"],
                        "ddp": ["trainer=ddp", "trainer.devices=2", "pretrain.micro_batch_size=4"]}.items():
        root = tmp_path / name
        (root / "demo").mkdir(parents=True)
        os.symlink(outputs / "demo" / "tokenize", root / "demo" / "tokenize")
        experiment = f"{name}-{uuid.uuid4().hex[:6]}"
        overrides = (outputs, tracking_uri, experiment, data_dir, *common, *extra, f"paths.outputs_dir={root}")
        if name == "single":  # the reference runs in this process; DDP needs the CLI, whose processes Lightning starts
            execute_stage("pretrain", load_stage("pretrain"), _compose(*overrides))
        else:
            proc = _cli(*overrides)
            out = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, out[-3000:]
        (run,) = mlflow_runs(tracking_uri, experiment)
        assert run.info.status == "FINISHED"
        results[name] = (_history(tracking_uri, run.info.run_id, "train/loss"), load_model(root / "demo" / "pretrain"))
    (loss1, model1), (loss2, model2) = results["single"], results["ddp"]
    # Step 1's loss is over the same global batch; step 2's shows the all-reduced update was the same.
    assert loss2[1] == pytest.approx(loss1[1], rel=1e-6)
    assert loss2[2] == pytest.approx(loss1[2], rel=1e-5)
    for (name, a), b in zip(model1.state_dict().items(), model2.state_dict().values()):
        # Adam's first steps move each weight by about lr * sign(gradient): where a gradient is ~0, the
        # order of the all-reduce's float sums may flip its sign, so compare most weights, not every one.
        close = torch.isclose(a, b, atol=1e-6, rtol=1e-4).float().mean()
        assert close > 0.99, f"{name}: only {close:.1%} of the weights agree after two steps"


def test_merge_refuses_an_adapter_whose_base_stage_was_rebuilt(outputs, tracking_uri, experiment, data_dir, tmp_path):
    """sft trains on pretrain's model; pretrain is rebuilt; merging the old adapter onto the new model is refused."""
    (tmp_path / "demo").mkdir()
    os.symlink(outputs / "demo" / "tokenize", tmp_path / "demo" / "tokenize")  # the shared tokenize output
    sources = [f"~sft.sources.{name}" for name in compose().sft.sources]
    seed_tasks = data_dir / "instruct" / "self_instruct" / "seed_tasks.jsonl"
    sft = ["sft.init.stage=pretrain", *sources, f"+sft.sources.seed={{format: self_instruct, path: {seed_tasks}}}",
           "sft.val_fraction=0.2", "sft.max_steps=2", "sft.micro_batch_size=4", "sft.eval_every_steps=2",
           "sft.ckpt_every_steps=2", "sft.optim.warmup_steps=1", "sft.generate.per_source=1",
           "sft.generate.max_new_tokens=2", "pretrain.max_steps=4", "pretrain.eval_every_steps=4",
           "pretrain.ckpt_every_steps=4", "pretrain.sample_every_steps=0", f"paths.outputs_dir={tmp_path}"]
    cfg = _compose(outputs, tracking_uri, experiment, data_dir, *sft)
    for stage in ("pretrain", "sft", "merge"):
        execute_stage(stage, load_stage(stage), cfg)
    assert (tmp_path / "demo" / "merge" / "model.pt").is_file()

    rebuilt = _compose(outputs, tracking_uri, experiment, data_dir, *sft, "pretrain.max_steps=5")
    execute_stage("pretrain", load_stage("pretrain"), rebuilt)
    with pytest.raises(PipelineError, match="pretrain was rebuilt after sft trained its adapter on it: run 'make sft' again"):
        execute_stage("merge", load_stage("merge"), rebuilt)
