"""The filter's run loop: it counts every reason, writes each rejected document with its own, computes the funnel."""
from __future__ import annotations

import json
import sys

import pyarrow.dataset as ds
import pytest

from pipeline.errors import PipelineError
from pipeline.filter.extract import ExtractSpec
from pipeline.filter.run import CrawlSource, run_filter
from pipeline.filter.steps import StepsSpec
from pipeline.filter.urls import UrlSpec
from tests.filter.test_rules import PROSE

SHORT = "The committee met on Tuesday to review the plan, and it agreed that the budget should be cut."


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": PROSE, "url": "https://a.example/1"}, {"text": SHORT, "url": "https://a.example/2"},
            {"text": PROSE, "url": "https://blocked.example/x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + '\n{"text": "broken\n' + json.dumps(rows[2]) + "\n")
    return {"j": CrawlSource(path=str(path))}


def test_every_document_is_kept_or_rejected_with_its_reason(docs, tmp_path):
    out = tmp_path / "out"
    stats = run_filter(docs, StepsSpec(urls=UrlSpec(blocklist=["blocked.example"])), out, num_proc=1,
                       samples_per_rule=5)
    assert stats["rules"] == {"gopher.min_words": 1, "read.bad_json": 1, "urls.blocklist": 1}
    assert stats["per_source"]["j"] | {"rejected_by_rule": None} == {
        "files": 1, "input": 4, "kept": 1, "rejected": 3, "toxic_flagged": 0, "rejected_by_rule": None}
    assert stats["funnel"] == [("input", 4), ("read", 3), ("urls", 2), ("extract", 2), ("langid", 2), ("gopher", 1),
                               ("c4", 1), ("toxicity", 1)]
    kept = ds.dataset(sorted((out / "kept").glob("*.parquet"))).to_table().to_pylist()
    rejected = ds.dataset(sorted((out / "rejected").glob("*.parquet"))).to_table().to_pylist()
    assert [(r["url"], r["lang"]) for r in kept] == [("https://a.example/1", "en")] and kept[0]["text"] == PROSE
    by_rule = {r["rule"]: r for r in rejected}
    assert {r["step"] for r in rejected} == {"read", "urls", "gopher"}
    assert by_rule["urls.blocklist"]["detail"] == "blocked.example"
    short = by_rule["gopher.min_words"]
    assert (short["value"], short["limit"], short["text"]) == (18, 50, SHORT) and short["metrics"]["words"] == 18
    assert by_rule["read.bad_json"]["record_id"] == "line 3"
    assert {s["rule"] for samples in stats["samples"].values() for s in samples} == set(stats["rules"])


def test_a_broken_package_fails_before_any_output(docs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trafilatura", None)
    with pytest.raises(PipelineError, match="pip install trafilatura"):
        run_filter(docs, StepsSpec(extract=ExtractSpec(engine="trafilatura")), tmp_path / "out", num_proc=2,
                   samples_per_rule=5)
    assert not (tmp_path / "out").exists()
