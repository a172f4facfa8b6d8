"""What dedup publishes: inputs read from a stage or files, shards, metrics, counts and the evaluation's files."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.sources import StageOrPath
from pipeline.dedup.evaluate import EvalSpec
from pipeline.dedup.io import eval_texts, read_input, write_parts
from pipeline.dedup.minhash import NearSpec
from pipeline.dedup.report import SUMMARY_KEYS, dedup_counts, dedup_metrics, near_eval, near_eval_lines, \
    near_eval_metrics, write_dedup_reports
from pipeline.dedup.run import DedupSpec, deduplicate
from pipeline.errors import BadInput


@pytest.fixture
def filter_dir(tmp_path, passages):
    """A filter stage's output: 30 kept passages (one an exact copy) and 3 rejected pages, one blank."""
    out = tmp_path / "filter"
    for part, texts in (("kept", passages[:29] + [passages[0]]), ("rejected", [passages[40], " ", passages[41]])):
        (out / part).mkdir(parents=True)
        pq.write_table(pa.table({"id": [f"{part}-{i}" for i in range(len(texts))], "text": texts}),
                       out / part / "part-00000.parquet")
    return out


def test_input_from_a_stage_and_the_evaluation_adds_the_filter_rejects(filter_dir):
    docs = read_input(StageOrPath(stage="filter"), {"filter": filter_dir})
    assert docs.table.num_rows == 30 and docs.label == f"the filter stage's kept documents ({filter_dir / 'kept'})"
    assert len(eval_texts(docs, EvalSpec(include_filter_rejected=False))) == 30
    assert len(eval_texts(docs, EvalSpec(include_filter_rejected=True))) == 32
    other = read_input(StageOrPath(stage="crawl"), {"crawl": filter_dir})  # only the filter stage has rejects
    assert len(eval_texts(other, EvalSpec(include_filter_rejected=True))) == 30


def test_input_from_files_names_the_setting_and_a_file_without_text(tmp_path):
    good, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_text('{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n')
    bad.write_text('{"id": "c", "body": "no text"}\n')
    docs = read_input(StageOrPath(path=str(good)), {})
    assert docs.table.column("text").to_pylist() == ["one", "two"] and docs.label == "dedup.input.path"
    with pytest.raises(BadInput, match=rf"^dedup\.input\.path: {bad} has no string column 'text' \(columns: id, body"):
        read_input(StageOrPath(path=str(tmp_path / "*.jsonl")), {})


def test_shards_split_by_rows_and_an_empty_part_still_has_one_file(tmp_path):
    table = pa.table({"id": [str(i) for i in range(5)], "text": ["x"] * 5})
    files = write_parts({"kept": table, "removed": table.slice(0, 0)}, tmp_path, rows_per_shard=2)
    assert files == {"kept": ["kept/part-00000.parquet", "kept/part-00001.parquet", "kept/part-00002.parquet"],
                     "removed": ["removed/part-00000.parquet"]}
    assert [pq.read_table(tmp_path / f).num_rows for f in files["kept"] + files["removed"]] == [2, 2, 1, 0]


def test_metrics_and_counts_account_for_every_document(filter_dir, tmp_path):
    spec = DedupSpec()
    spec.near.num_proc = 1
    table = read_input(StageOrPath(stage="filter"), {"filter": filter_dir}).table
    stats = deduplicate(table, spec, progress=False).stats
    counts, metrics = dedup_counts(stats), dedup_metrics(stats)
    assert counts["input"] == 30 and counts["kept"] == 29 and counts["removed"] == 1
    assert counts["removed_by_level"] == {"empty": 0, "url": 0, "exact": 1, "near": 0, "lines": 0}
    assert counts["cluster_sizes"] == {"1": 28, "2": 1} and counts["near"]["near_indexed"] == 29
    assert metrics["dedup/removed/exact"] == 1 and metrics["dedup/removed_fraction/exact"] == 1 / 30
    assert metrics["dedup/kept_fraction"] == 29 / 30 and metrics["dedup/clusters"] == 1
    assert metrics["dedup/largest_cluster"] == 2 and metrics["dedup/near/pairs"] == 0
    assert metrics["dedup/url/missing"] == 30 and "dedup/lines/removed" in metrics
    assert metrics["dedup/lines/headings_kept"] == 0 == counts["lines"]["lines_headings_kept"]
    lines, plot = write_dedup_reports(stats, tmp_path)
    assert json.loads(lines.read_text()) == {"removed": [], "kept_headings": []}
    assert plot.name == "clusters.png" and plot.stat().st_size > 0


def test_evaluation_metrics_leave_out_what_cannot_be_measured():
    part = {"precision": 1.0, "recall": 0.5, "true_pairs": 2, "detected_pairs": 1}
    report = {"documents": 10, "planted": 3, "overall": part, "planted_pairs": part,
              "real": {"precision": math.nan, "recall": math.nan, "true_pairs": 0, "detected_pairs": 0},
              "by_edit_rate": {"0": {"detected": 1.0}, "0.1": {"detected": 0.0}}}
    metrics = near_eval_metrics(report)
    assert metrics["dedup_eval/recall"] == 0.5 and metrics["dedup_eval/planted/precision"] == 1.0
    assert "dedup_eval/real/precision" not in metrics and metrics["dedup_eval/real/true_pairs"] == 0
    assert metrics["dedup_eval/detected_at_edit_rate/0.1"] == 0.0 and metrics["dedup_eval/planted"] == 3


def test_near_eval_writes_its_report_and_plot(passages, tmp_path):
    evaluation = near_eval(passages[:60], NearSpec(num_proc=1), EvalSpec(planted=14, max_docs=200), tmp_path,
                           progress=False)
    assert [p.name for p in evaluation.files] == ["near_eval.json", "near_detection.png"]
    report = json.loads(evaluation.files[0].read_text())
    assert tuple(evaluation.summary) == SUMMARY_KEYS and "curve" in report and report["planted"] == 14
    assert evaluation.metrics == near_eval_metrics(report) and evaluation.summary["overall"]["recall"] >= 0.9
    text = near_eval_lines(evaluation.summary)
    assert text[0].startswith("near-duplicates at threshold 0.8 (b=16, r=8, verify=exact): precision ")
    assert len(text) == 1 + len(evaluation.summary["by_edit_rate"])
