"""sft and merge end to end: real instruction files, a real MLflow store, Lightning training of a tiny model.

The base is a stage-style directory (model.pt + tokenizer.json) holding a tiny GPT and the byte-level
tokenizer with the chat markers, given as sft.init.path, so no earlier stage has to run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient
from tokenizers import Tokenizer

from pipeline import PROJECT_ROOT
from pipeline.config import compose
from pipeline.contract import execute_stage
from pipeline.errors import PipelineError
from pipeline.model.gpt import GPT, ModelConfig, load_model, save_model
from pipeline.sft.chat import get_template, render
from pipeline.sft.lora import load_adapter
from pipeline.stages import load_stage
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer
from tests.conftest import mlflow_runs, sigterm_at

BAD_RECORDS = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Say bye"},  # no output
    {"instruction": "Name a colour", "input": "", "output": ""},  # empty output
    {"instruction": ["not", "a", "string"], "input": "", "output": "x"},  # non-string content
    "not even an object",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random GPT with the byte tokenizer: what a training stage's output directory holds."""
    directory = tmp_path_factory.mktemp("base")
    tokenizer = byte_tokenizer(SpecialTokens().all())
    tokenizer.save(str(directory / "tokenizer.json"))
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, context=256, vocab_size=tokenizer.get_vocab_size()))
    save_model(model, directory / "model.pt")
    return directory


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("instruct") / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in BAD_RECORDS) + "\n{broken json\n")
    return path


@pytest.fixture(scope="module")
def demo_sources() -> list[str]:
    """Overrides that remove the demo preset's sources (a structured map cannot be deleted whole)."""
    return [f"~sft.sources.{name}" for name in compose().sft.sources]


def overrides(demo_sources: list[str], base_dir: Path, bad_file: Path, outputs: Path, tracking_uri: str, experiment: str, data_dir: Path,
              *extra: str) -> list[str]:
    instruct = data_dir / "instruct"
    return [f"paths.outputs_dir={outputs}", f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}",
            f"paths.data_dir={data_dir}", "sft.init.stage=null", f"sft.init.path={base_dir}", *demo_sources,
            f"+sft.sources.seed={{format: self_instruct, path: {instruct}/self_instruct/seed_tasks.jsonl}}",
            f"+sft.sources.oasst={{format: oasst_tree, path: {instruct}/oasst/en_100_tree.jsonl.gz}}",
            f"+sft.sources.mine={{format: alpaca, path: {bad_file}, weight: 2}}",
            "sft.val_fraction=0.2", "sft.drop_truncated=false", "sft.max_steps=30", "sft.micro_batch_size=8",
            "sft.eval_every_steps=10", "sft.log_every_steps=5", "sft.ckpt_every_steps=10", "sft.optim.warmup_steps=5",
            "sft.optim.lr=5e-3", "sft.generate.per_source=2", "sft.generate.max_new_tokens=8", *extra]


@pytest.fixture
def sft_cfg(demo_sources, base_dir, bad_file, tmp_path, tracking_uri, experiment, data_dir):
    def _compose(*extra: str):
        return compose(*overrides(demo_sources, base_dir, bad_file, tmp_path / "outputs", tracking_uri, experiment,
                                  data_dir, *extra))
    return _compose


def test_lora_sft_trains_tracks_and_merges(sft_cfg, base_dir, tmp_path, tracking_uri, experiment):
    cfg = sft_cfg()
    manifest = execute_stage("sft", load_stage("sft"), cfg)
    out = tmp_path / "outputs" / "demo" / "sft"
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.info.status == "FINISHED"
    m = run.data.metrics

    # bad records are counted by reason and the run goes on; the one good record of the file trains
    assert manifest["counts"]["bad_records"]["mine"] == {"missing_output": 1, "empty_output": 1,
                                                         "not_string_instruction": 1, "not_an_object": 1,
                                                         "invalid_json": 1}
    assert m["data/mine/bad_records"] == 5 and m["data/mine/read"] == 1
    assert m["data/seed/read"] == 175 and m["data/oasst/read"] == 95
    # LoRA: a small share trains, and the held-out loss (trained tokens only) goes down from the base's
    assert 0 < m["sft/trainable_fraction"] < 0.1
    assert m["val/loss"] < m["before/loss"] and m["val_seed/loss"] < m["before_seed/loss"]
    per_source = [m[f"val_{name}/loss"] for name in ("seed", "oasst")]  # "mine" has one record: none held out
    assert min(per_source) < m["val/loss"] < max(per_source)  # all sources together, weighted by their tokens
    for key in ("gen/base/exact_match", "gen/sft/exact_match", "gen/base/rouge_l", "gen/sft/rouge_l",
                "gen/sft/seed/rouge_l", "train/tokens_per_s"):
        assert key in m, key

    # the adapter, the comparison table and the generations are MLflow artifacts
    client = MlflowClient(tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "comparison.md", "generations.md", "generations.json", "bad_records.json"} <= artifacts
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= \
        {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "generations.json", str(tmp_path))).read_text())
    assert {"source", "reference", "base", "sft", "sft_rouge_l"} <= set(table["columns"])
    assert len(table["data"]) == m["gen/examples"] > 0
    comparison = (out / "comparison.md").read_text()
    assert "| held-out loss (nats/token), all | " in comparison and "ROUGE-L F1, seed" in comparison

    # the base weights under the adapter are the base model's, untouched; the adapter moved
    base = load_model(base_dir)
    tuned = load_adapter(load_model(base_dir), out / manifest["outputs"]["adapter"])
    originals = dict(base.named_parameters())
    for name, p in tuned.get_base_model().named_parameters():
        if "lora_" not in name and "trainable_tokens_delta" not in name:
            assert torch.equal(p, originals[name.replace(".base_layer", "").replace(".token_adapter", "")]), name
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if "lora_B" in n)
    # the chat markers' embedding rows trained too (sft.lora.chat_tokens), and nothing else of the embedding
    tokenizer = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    markers = get_template("chatml").special_tokens
    assert manifest["outputs"]["lora"]["tokens"] == [tokenizer.token_to_id(t) for t in markers]
    # a LoRA checkpoint holds the adapter, the marker rows and the optimizer state, not the frozen base
    (ckpt,) = [out / "checkpoints" / c for c in manifest["outputs"]["checkpoints"][-1:]]
    blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert blob["state_dict"] and all("lora_" in k or "trainable_tokens_delta" in k for k in blob["state_dict"])
    assert any("trainable_tokens_delta" in k for k in blob["state_dict"])
    assert blob["optimizer_states"]

    # merge: one plain model with the adapter's logits, and a transformers directory that loads offline
    merged_manifest = execute_stage("merge", load_stage("merge"), sft_cfg())
    merged_dir = tmp_path / "outputs" / "demo" / "merge"
    assert merged_manifest["metrics"]["merge/max_logit_diff"] < 1e-4
    ids = torch.randint(0, base.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    merged = load_model(merged_dir)
    with torch.no_grad():
        assert torch.allclose(merged(ids)[0], tuned.eval()(ids)[0], atol=1e-4)
        assert not torch.allclose(merged(ids)[0], base(ids)[0], atol=1e-4)
    rows = manifest["outputs"]["lora"]["tokens"]
    others = [i for i in range(base.cfg.vocab_size) if i not in rows]
    assert torch.equal(merged.tok_emb.weight[others], base.tok_emb.weight[others])
    assert not torch.allclose(merged.tok_emb.weight[rows], base.tok_emb.weight[rows])
    assert merged.lm_head.weight is merged.tok_emb.weight

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(merged_dir / "hf", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir / "hf", local_files_only=True)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, merged(ids)[0], atol=1e-4)
    chat = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "red"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == render(chat, "chatml", "<s>", "</s>")


def test_full_fine_tuning_with_packing(sft_cfg, tmp_path, tracking_uri, experiment):
    manifest = execute_stage("sft", load_stage("sft"), sft_cfg("sft.lora.enabled=false", "sft.packing=true",
                                                               "sft.max_steps=10", "sft.optim.lr=1e-3"))
    (run,) = mlflow_runs(tracking_uri, experiment)
    m = run.data.metrics
    assert run.info.status == "FINISHED" and m["sft/trainable_fraction"] == 1.0
    assert 0 < m["data/packing_fill"] <= 1 and m["data/packed_rows"] < m["data/train_examples"]
    assert m["val/loss"] < m["before/loss"]
    assert "model" in manifest["outputs"] and "adapter" not in manifest["outputs"]
    merged = execute_stage("merge", load_stage("merge"), sft_cfg("sft.lora.enabled=false"))
    assert merged["metrics"]["merge/max_logit_diff"] == 0.0


def test_bad_configs_are_named(sft_cfg):
    with pytest.raises(PipelineError, match="sft.sources is empty"):
        execute_stage("sft", load_stage("sft"), sft_cfg("~sft.sources.seed", "~sft.sources.oasst", "~sft.sources.mine"))
    with pytest.raises(PipelineError, match="format 'alpacca' is unknown"):
        execute_stage("sft", load_stage("sft"), sft_cfg("sft.sources.seed.format=alpacca"))
    # a bad choice or value is refused when the config is composed, naming its key
    with pytest.raises((ConfigCompositionException, PipelineError), match="sft.template"):
        sft_cfg("sft.template=vicuna")
    with pytest.raises(PipelineError, match="sft.init"):
        sft_cfg("sft.init.stage=cpt")  # and sft.init.path: both set


def test_inspect_prints_the_conversations_as_sft_trains_on_them(demo_sources, base_dir, bad_file, tmp_path,
                                                               tracking_uri, experiment, data_dir, capsys):
    from pipeline.tools.inspect_sft import main

    args = overrides(demo_sources, base_dir, bad_file, tmp_path, tracking_uri, experiment, data_dir)
    assert main(["-n", "1", "--source", "mine", *args]) == 0
    out = capsys.readouterr().out
    tokenizer_json = base_dir / "tokenizer.json"
    assert out.startswith(f"template chatml, window 256 tokens, {tokenizer_json}; trained tokens: [[like this]]")
    assert "=== mine: 1 conversations read, bad records: empty_output 1, invalid_json 1, missing_output 1" in out
    assert "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n[[hi<|im_end|>]]" in out
    assert "=== seed" not in out
    assert main(["--source", "nope", *args]) == 2
    assert "error: --source nope: not in sft.sources (seed, oasst, mine)" in capsys.readouterr().err
    assert main([*args, "sft.template=vicuna"]) == 2
    assert "sft.template=vicuna: Invalid value 'vicuna'" in capsys.readouterr().err


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "sft", *args], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_uninterrupted_adapter(demo_sources, base_dir, bad_file, tmp_path, tracking_uri, data_dir):
    steps = ["sft.max_steps=40", "sft.ckpt_every_steps=10", "sft.eval_every_steps=20", "sft.log_every_steps=1",
             "sft.lora.dropout=0", "sft.generate.per_source=0"]
    runs = {}
    for name in ("straight", "killed"):
        experiment = f"{name}-{uuid.uuid4().hex[:6]}"
        runs[name] = (experiment, overrides(demo_sources, base_dir, bad_file, tmp_path / name, tracking_uri, experiment, data_dir,
                                            *steps))
    # The reference needs no process of its own: the same stage in this one (the killed run and its resume are CLI).
    execute_stage("sft", load_stage("sft"), compose(*runs["straight"][1]))

    proc = _cli(*runs["killed"][1])
    ckpt_dir = tmp_path / "killed" / "demo" / "sft.ckpt"
    out = sigterm_at(proc, ckpt_dir / "step-000010.ckpt")
    stopped_at = int(sorted(p.name for p in ckpt_dir.glob("step-*.ckpt"))[-1][5:11])
    assert 10 <= stopped_at < 40, out[-2000:]

    proc = _cli(*runs["killed"][1])
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    (first,) = mlflow_runs(tracking_uri, runs["killed"][0])
    assert f"resuming MLflow run {first.info.run_id}" in out and first.info.status == "FINISHED"
    (reference,) = mlflow_runs(tracking_uri, runs["straight"][0])
    assert first.data.metrics["val/loss"] == pytest.approx(reference.data.metrics["val/loss"], rel=1e-5)
    from safetensors.torch import load_file

    ours, theirs = (load_file(tmp_path / name / "demo" / "sft" / "adapter" / "adapter_model.safetensors")
                    for name in ("killed", "straight"))
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
