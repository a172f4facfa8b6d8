"""Score first, threshold later: a filter run that changes only thresholds judges the stored scores again.

The inputs are overwritten with zeros of the same size and modification time after the scores are
stored, so a run that read them would reject every record as corrupt: only the stored scores can give
the full run's answer.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.contract import execute_stage
from pipeline.filter.run import CrawlSource
from pipeline.stages import load_stage
from tests.filter.test_rules import MORE, PROSE

STRICT = ("filter.gopher.min_words=300", "filter.c4.min_sentences=8")


def _run(make_cfg, out: Path, sources: dict, *overrides: str) -> tuple[dict, Path]:
    cfg = make_cfg(*overrides, outputs_dir=out)
    cfg.filter.sources = {name: CrawlSource(**spec) for name, spec in sources.items()}
    return execute_stage("filter", load_stage("filter"), cfg), out / "demo" / "filter"


def _output(stage_dir: Path) -> dict:
    """Every kept and rejected shard (rows in order) and the rejected samples."""
    out = {part: {p.name: pq.read_table(p).to_pylist() for p in sorted((stage_dir / part).glob("*.parquet"))}
           for part in ("kept", "rejected")}
    out["samples"] = json.loads((stage_dir / "rejected_samples.json").read_text())
    return out


def _counts(manifest: dict) -> dict:
    return {k: v for k, v in manifest["counts"].items() if k != "scores"}


def _zero_out(folder: Path) -> None:
    for f in folder.iterdir():
        st = f.stat()
        f.write_bytes(bytes(st.st_size))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.slow
def test_changing_only_thresholds_gives_the_full_runs_output_without_reading_the_input(make_cfg, data_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(data_dir / "crawl/warc/dolma/sample-0000.warc.gz", inputs / "a.warc.gz")
    shutil.copy(data_dir / "crawl/ccnet_docs/cc_en_head-0091.jsonl.gz", inputs / "b.jsonl.gz")
    with gzip.open(inputs / "c.jsonl.gz", "wt") as fh:  # under 300 words, with an address and a menu line
        fh.write(json.dumps({"text": f"Menu\n{PROSE}\nWrite to jane.doe@example.org with your views.\n{MORE}"}) + "\n")
    sources = {"warc": {"path": str(inputs / "*.warc.gz")}, "ccnet": {"path": str(inputs / "*.jsonl.gz")}}
    strict, strict_dir = _run(make_cfg, tmp_path / "strict", sources, *STRICT)
    loose, loose_dir = _run(make_cfg, tmp_path / "loose", sources)
    assert strict["counts"]["scores"]["rethresholded_from"] is None is loose["counts"]["scores"]["rethresholded_from"]
    assert strict["counts"]["kept"] < loose["counts"]["kept"], "the thresholds matter on this input"
    full_strict, full_loose = _output(strict_dir), _output(loose_dir)
    _zero_out(inputs)

    # stricter: documents go from kept to rejected
    again, _ = _run(make_cfg, tmp_path / "loose", sources, *STRICT)
    assert again["counts"]["scores"]["rethresholded_from"] == str(loose_dir)
    assert _output(loose_dir) == full_strict and _counts(again) == _counts(strict)
    assert again["config_hash"] == strict["config_hash"]

    # looser: documents come back, with C4's lines removed and PII redacted as a full run does it
    back, _ = _run(make_cfg, tmp_path / "strict", sources)
    assert back["counts"]["scores"]["rethresholded_from"] == str(strict_dir)
    assert _output(strict_dir) == full_loose and _counts(back) == _counts(loose)
    (mine,) = [r for rows in _output(strict_dir)["kept"].values() for r in rows if r["file"].endswith("c.jsonl.gz")]
    assert mine["text"].startswith(PROSE) and "<EMAIL> with your views." in mine["text"] and back["counts"]["pii_redacted"]

    # PII redaction is applied after the rules too: another placeholder needs no input either
    relabelled, _ = _run(make_cfg, tmp_path / "strict", sources, "filter.pii.email=MAIL_ADDRESS")
    assert relabelled["counts"]["scores"]["rethresholded_from"] == str(strict_dir)
    (mine,) = [r for rows in _output(strict_dir)["kept"].values() for r in rows if r["file"].endswith("c.jsonl.gz")]
    assert "MAIL_ADDRESS with your views." in mine["text"]

    # a setting the scores depend on: the input is read again (and is junk now)
    rescored, _ = _run(make_cfg, tmp_path / "strict", sources, "filter.c4.min_words_per_line=3")
    assert rescored["counts"]["scores"]["rethresholded_from"] is None
    assert rescored["counts"]["kept"] == 0 and "read.corrupt" in rescored["counts"]["rejected_by_rule"]


@pytest.mark.slow
def test_editing_a_word_list_is_a_new_config_and_new_scores(make_cfg, data_dir, tmp_path):
    lists = tmp_path / "ldnoobw"
    shutil.copytree(data_dir / "wordlists/ldnoobw", lists)
    docs = tmp_path / "docs.jsonl.gz"
    with gzip.open(docs, "wt") as fh:
        for i, text in enumerate([PROSE + " " + MORE, PROSE + " The harvest was a zorblax of a year. " + MORE]):
            fh.write(json.dumps({"text": text, "url": f"https://example.org/{i}"}) + "\n")
    sources = {"docs": {"path": str(docs)}}
    key = f"filter.c4.bad_words={lists}"
    first, _ = _run(make_cfg, tmp_path / "out", sources, key)
    assert first["counts"]["kept"] == 2 and first["files"][str(lists / "en")]
    with open(lists / "en", "a") as fh:
        fh.write("zorblax\n")
    second, _ = _run(make_cfg, tmp_path / "out", sources, key)
    assert second["config_hash"] != first["config_hash"] and second["files"] != first["files"]
    assert second["counts"]["scores"]["rethresholded_from"] is None, "the scores counted bad words with the old list"
    assert second["counts"]["rejected_by_rule"] == {"c4.bad_words": 1}
