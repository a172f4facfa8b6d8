"""The filter stage on a WARC with junk in it and on 50 MB single-line documents: all counted, nothing hangs."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline import PROJECT_ROOT
from pipeline.contract import MANIFEST, execute_stage
from pipeline.filter.run import CrawlSource
from pipeline.stages import load_stage

BIG = 50 * 2**20
PEAK_LIMIT = 1500 * 2**20  # this run peaks near 730 MiB here; reading the 50 MB page whole took 2 to 4.6 GB


def _run(make_cfg, sources: dict) -> tuple[dict, list[dict]]:
    cfg = make_cfg()
    cfg.filter.sources = {name: CrawlSource(**spec) for name, spec in sources.items()}
    counts = execute_stage("filter", load_stage("filter"), cfg)["counts"]
    out = Path(cfg.paths.outputs_dir) / "demo" / "filter"
    rejected = pads.dataset(sorted((out / "rejected").glob("*.parquet"))).to_table().to_pylist()
    return counts, rejected


@pytest.mark.slow
def test_junk_after_a_warc_is_one_counted_rejection_and_every_record_is_there(make_cfg, tmp_path, data_dir):
    clean, damaged = tmp_path / "clean", tmp_path / "damaged"
    clean.mkdir()
    damaged.mkdir()
    original = data_dir / "crawl/warc/dolma/sample-0000.warc.gz"  # 24 documents
    shutil.copy(original, clean / "sample.warc.gz")
    junk = b"\xff" + np.random.default_rng(1).bytes(5000)
    (damaged / "sample.warc.gz").write_bytes(original.read_bytes() + junk)

    before, _ = _run(make_cfg, {"warc": {"path": str(clean)}})
    counts, rejected = _run(make_cfg, {"warc": {"path": str(damaged)}})
    s = counts["per_source"]["warc"]
    assert before["per_source"]["warc"]["input"] == 24
    assert s["input"] == 25 and s["kept"] + s["rejected"] == 25
    assert s["kept"] == before["per_source"]["warc"]["kept"]
    assert s["rejected_by_rule"] == {**before["per_source"]["warc"]["rejected_by_rule"], "read.corrupt": 1}
    (bad,) = [r for r in rejected if r["rule"] == "read.corrupt"]
    size = original.stat().st_size
    assert bad["record_id"] == f"offset {size}" and bad["raw"] == junk
    assert bad["detail"].startswith(f"5,001 bytes from byte {size:,} to the end of the file cannot be read")


def _words(data_dir: Path) -> str:
    rows = [json.loads(line) for line in gzip.open(data_dir / "crawl/ccnet_docs/cc_en_head-0091.jsonl.gz", "rt")]
    return " ".join(" ".join(r["text"].split()) for r in rows)


@pytest.mark.slow
def test_a_50_mb_single_line_document_is_rejected_by_size_at_once(tmp_path, data_dir, tracking_uri, experiment):
    words = _words(data_dir)
    pages, docs = tmp_path / "pages", tmp_path / "docs"
    pages.mkdir()
    docs.mkdir()
    with open(pages / "huge.html", "w") as fh:  # one line of 50 MB
        fh.write("<html><body><p>")
        while fh.tell() < BIG:
            fh.write(words + " ")
        fh.write("</p></body></html>")
    with open(docs / "docs.jsonl", "w") as fh:  # a normal document, one of 50 MB, another normal one
        fh.write(json.dumps({"text": words[:5000]}) + "\n")
        start = fh.tell()
        fh.write('{"text": "')
        while fh.tell() < BIG:
            fh.write(json.dumps(words)[1:-1] + " ")
        fh.write('"}')
        sizes = {"huge.html": (pages / "huge.html").stat().st_size, "docs.jsonl": fh.tell() - start}
        fh.write("\n" + json.dumps({"text": words[-5000:]}) + "\n")

    # One process (num_proc=1) of its own, so its peak memory is the stage's: os.wait4 reports it.
    out = tmp_path / "outputs"
    args = ["filter", f"paths.outputs_dir={out}", f"tracking.experiment={experiment}", "filter.num_proc=1",
            "~filter.sources.warc", "~filter.sources.html", "~filter.sources.ccnet",
            f"++filter.sources.pages.path={pages}", f"++filter.sources.docs.path={docs}"]
    log = tmp_path / "filter.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, stdout=fh, stderr=fh,
                                env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, log.read_text()[-3000:]
    peak = usage.ru_maxrss * 1024
    counts = json.loads((out / "demo/filter" / MANIFEST).read_text())["counts"]
    rejected = pads.dataset(sorted((out / "demo/filter/rejected").glob("*.parquet"))).to_table().to_pylist()

    for name, inputs in (("pages", 1), ("docs", 3)):
        s = counts["per_source"][name]
        assert s["input"] == inputs == s["kept"] + s["rejected"] and s["rejected_by_rule"].get("read.too_large") == 1
    too_large = {Path(r["file"]).name: r for r in rejected if r["rule"] == "read.too_large"}
    for name, size in sizes.items():
        assert too_large[name]["detail"].startswith(f"{size:,} bytes, more than filter.max_document_bytes = 5,242,880")
        assert len(too_large[name]["raw"]) <= 2**16 and too_large[name]["text"] is None  # a head at most
    print(f"peak memory of the filter process: {peak / 2**20:.0f} MiB")
    assert peak < PEAK_LIMIT, f"the filter process peaked at {peak / 2**20:.0f} MiB for two 50 MB documents"
