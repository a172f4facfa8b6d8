"""`make bench` machinery: a quick run writes a result with both sides measured on the same corpus."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from pipeline import PROJECT_ROOT
from tests.conftest import link_tokenize, web_without_filter


@pytest.mark.slow
def test_quick_tokenize_bench_writes_its_ratio(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench", "tokenize_encode", "--quick", "--out", str(tmp_path),
                           *(f"-o={o}" for o in [*web_without_filter(data_dir), f"paths.outputs_dir={tmp_path}"])],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tokenize_encode.json").read_text())
    assert result["corpus"]["sources"] == ["shakespeare", "web"] and result["corpus"]["mb"] > 1
    assert len(result["baseline"]["runs"]) == len(result["candidate"]["runs"]) == 2
    # the JSON's rates are rounded to 3 decimals: below 1 MB/s (a busy machine) that alone moves their ratio by >1e-3
    assert result["ratio"] == pytest.approx(result["candidate"]["mb_per_s"] / result["baseline"]["mb_per_s"], rel=5e-3)
    fast = result["raw_encode_batch_fast"]
    assert len(fast["runs"]) == 2 and fast["ratio"] == pytest.approx(result["candidate"]["mb_per_s"] / fast["mb_per_s"], rel=5e-3)
    assert "tokenize_encode" in proc.stdout and "ratio" in proc.stdout


@pytest.mark.slow
def test_quick_dedup_bench_measures_both_sides(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench", "dedup_near", "--quick", "--out", str(tmp_path)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "dedup_near.json").read_text())
    assert result["corpus"]["documents"] == 2000 and result["corpus"]["bands_rows"] == [16, 8]
    assert len(result["baseline"]["runs"]) == len(result["candidate"]["runs"]) == 2
    assert result["ratio"] == pytest.approx(result["candidate"]["docs_per_s"] / result["baseline"]["docs_per_s"], abs=0.01)
    assert "dedup_near" in proc.stdout


def _bench(name: str, out, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.bench", name, "--quick", "--out", str(out),
                           *(f"-o={o}" for o in overrides)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_pretrain_step_bench_trains_the_same_model_both_ways(tmp_path):
    proc = _bench("pretrain_step", tmp_path, f"paths.outputs_dir={tmp_path / 'outputs'}")  # no shards: random ids
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "pretrain_step.json").read_text())
    assert result["data"].startswith("random token ids") and result["model"]["n_layer"] == 2
    b, c = result["baseline"], result["candidate"]
    assert len(b["runs"]) == len(c["runs"]) == result["rounds"] == 2
    assert result["ratio"] == pytest.approx(c["tokens_per_s"] / b["tokens_per_s"], abs=1e-3)
    # same initial weights, windows, optimizer and clipping: Lightning and the plain loop take the same steps
    assert c["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)
    assert "pretrain_step" in proc.stdout and "tokens_per_s" in proc.stdout


@pytest.fixture
def tiny_tokenized(tokenized, tmp_path):
    """An outputs folder holding the session's tiny tokenize output (make_cfg's tokenize: vocabulary 512)."""
    link_tokenize(tokenized, tmp_path / "outputs")
    return tmp_path / "outputs"


@pytest.mark.slow
def test_quick_pretrain_budget_bench_reports_loss_and_bits_per_byte(tiny_tokenized, tmp_path):
    proc = _bench("pretrain_budget", tmp_path / "bench", f"paths.outputs_dir={tiny_tokenized}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench" / "pretrain_budget.json").read_text())
    tok = json.loads((tiny_tokenized / "demo" / "tokenize" / "manifest.json").read_text())
    assert result["model"]["vocab_size"] == 512 and result["budget"]["tokens"] == 50 * 16 * 64
    for side in (result["baseline"], result["candidate"]):
        assert side["val_loss"] < math.log(512), "50 steps should beat a uniform guess"
        assert side["val_bpb"] == pytest.approx(
            side["val_loss"] / math.log(2) / tok["metrics"]["tokenize/val_bytes_per_token"], rel=1e-3)
    assert result["ratio"] == pytest.approx(result["baseline"]["val_loss"] / result["candidate"]["val_loss"], abs=1e-3)


@pytest.mark.slow
def test_benches_without_shards_say_to_run_make_tokenize(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench", "pretrain_budget", "sweep_parallel", "--quick",
                           "--out", str(tmp_path), f"-o=paths.outputs_dir={tmp_path / 'outputs'}"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert [e.split(":")[1].strip() for e in errors] == ["pretrain_budget", "sweep_parallel"], proc.stderr[-2000:]
    assert all("run 'make tokenize' first" in e for e in errors) and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_quick_sft_lora_bench_fine_tunes_the_same_model_both_ways(tmp_path):
    proc = _bench("sft_lora", tmp_path, f"paths.outputs_dir={tmp_path / 'outputs'}")  # no tokenizer: bytes
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "sft_lora.json").read_text())
    assert result["tokenizer"].startswith("bytes") and result["model"]["n_layer"] == 2
    b, c, packed = result["baseline"], result["candidate"], result["packing"]
    assert len(b["runs"]) == len(c["runs"]) == len(packed["runs"]) == result["rounds"] == 2
    assert b["steps"] == c["steps"] == packed["steps"] == result["untimed_steps"] + result["timed_steps"]
    assert b["timed_steps"] == c["timed_steps"] == result["timed_steps"]
    assert result["ratio"] == pytest.approx(c["tokens_per_s"] / b["tokens_per_s"], abs=1e-3)
    assert result["memory_ratio"] == pytest.approx(c["peak_memory_mb"] / b["peak_memory_mb"], abs=1e-3)
    assert 0 < c["trainable_params"] < b["trainable_params"] == b["total_params"]
    assert b["peak_memory_mb"] > 0 and c["peak_memory_mb"] > 0
    # same weights and first batch, and a fresh adapter (B = 0) computes the base model exactly
    assert c["initial_loss"] == pytest.approx(b["initial_loss"], rel=1e-6)
    sizes = result["trainable_by_size"]
    assert sizes["gpt1"]["fraction"] < sizes["medium"]["fraction"] < sizes["mini"]["fraction"] < 0.05
    assert "sft_lora" in proc.stdout and "peak memory LoRA/full" in proc.stdout


@pytest.mark.slow
def test_quick_dpo_lora_bench_times_both_arms_on_the_same_batches(tmp_path):
    proc = _bench("dpo_lora", tmp_path, f"paths.outputs_dir={tmp_path / 'outputs'}")  # no tokenizer: bytes
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "dpo_lora.json").read_text())
    b, c = result["baseline"], result["candidate"]
    assert result["tokenizer"].startswith("bytes") and result["rows_per_micro_batch"] == 2 * result["pairs_per_micro_batch"]
    assert len(b["runs"]) == len(c["runs"]) == result["rounds"] == 2
    assert result["ratio"] == pytest.approx(c["tokens_per_s"] / b["tokens_per_s"], abs=1e-3)
    assert b["tokens_per_s"] > 0 and c["tokens_per_s"] > 0 and result["timed_steps"] == 4
    assert "dpo_lora" in proc.stdout
