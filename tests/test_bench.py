"""`make bench` machinery: a quick run writes a result with both sides measured on the same corpus."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import PROJECT_ROOT
from tests.conftest import web_without_filter


@pytest.mark.slow
def test_quick_tokenize_bench_writes_its_ratio(tmp_path, data_dir):
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench", "tokenize_encode", "--quick", "--out", str(tmp_path),
                           *(f"-o={o}" for o in web_without_filter(data_dir))],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tokenize_encode.json").read_text())
    assert result["corpus"]["sources"] == ["shakespeare", "web"] and result["corpus"]["mb"] > 1
    assert len(result["baseline"]["runs"]) == len(result["candidate"]["runs"]) == 2
    assert result["ratio"] == pytest.approx(result["candidate"]["mb_per_s"] / result["baseline"]["mb_per_s"], abs=1e-3)
    fast = result["raw_encode_batch_fast"]
    assert len(fast["runs"]) == 2 and fast["ratio"] == pytest.approx(result["candidate"]["mb_per_s"] / fast["mb_per_s"], abs=1e-3)
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
