"""The filter stage on a WARC with junk in it and on 50 MB single-line documents: all counted, nothing hangs."""
from __future__ import annotations

import gzip
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline.contract import execute_stage
from pipeline.filter.run import CrawlSource
from pipeline.stages import load_stage

BIG = 50 * 2**20


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
def test_a_50_mb_single_line_document_is_rejected_by_size_at_once(make_cfg, tmp_path, data_dir):
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

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.time()
    counts, rejected = _run(make_cfg, {"pages": {"path": str(pages)}, "docs": {"path": str(docs)}})
    seconds = time.time() - started
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before

    for name, inputs in (("pages", 1), ("docs", 3)):
        s = counts["per_source"][name]
        assert s["input"] == inputs == s["kept"] + s["rejected"] and s["rejected_by_rule"].get("read.too_large") == 1
    too_large = {Path(r["file"]).name: r for r in rejected if r["rule"] == "read.too_large"}
    for name, size in sizes.items():
        assert too_large[name]["detail"].startswith(f"{size:,} bytes, more than filter.max_document_bytes = 5,242,880")
        assert len(too_large[name]["raw"]) <= 2**16 and too_large[name]["text"] is None  # a head at most
    assert seconds < 60, f"{seconds:.0f} s"
    assert grown < 500 * 2**20, f"the peak memory grew by {grown / 2**20:.0f} MiB"
