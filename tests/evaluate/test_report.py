"""The evaluate stage's tables and metric names."""
from __future__ import annotations

import math

import pytest

from pipeline.evaluate.perplexity import Totals
from pipeline.evaluate.prompting import TaskResult
from pipeline.evaluate.report import ALL, Row, matrix, metrics_of, prompting_report


def test_the_table_puts_models_across_and_sets_with_sources_down():
    rows = [Row("pre", "corpus", ALL, Totals(100.0, 50, 200, 2)), Row("pre", "corpus", "web", Totals(60.0, 30, 100, 1)),
            Row("cpt", "corpus", ALL, Totals(80.0, 50, 200, 2))]
    lines = matrix(rows).splitlines()
    assert lines[0] == "| bits/byte (perplexity) | pre | cpt |"
    bpb, ppl = 100 / math.log(2) / 200, math.exp(2.0)
    assert lines[2] == f"| corpus | {bpb:.4f} ({ppl:.1f}) | {80 / math.log(2) / 200:.4f} ({math.exp(1.6):.1f}) |"
    assert lines[3].startswith("| corpus / web | ") and lines[3].endswith(" |  |"), "cpt has no per-source row"
    m = metrics_of(rows)
    assert m["eval/pre/corpus/bpb"] == pytest.approx(bpb) and m["eval/pre/corpus/web/loss"] == 2.0 and "eval/cpt/corpus/ppl" in m


def test_prompting_report_sets_baselines_beside_each_model():
    def result(accuracy, shots):
        return TaskResult("sst2", shots, accuracy, [[1, 1], [0, 2]], 4, 0.5, 0.75, [], ["neg", "pos"], skipped=1)

    summary, details, metrics = prompting_report([("pre", result(0.75, 0)), ("cpt", result(0.5, 0)),
                                                  ("pre", result(1.0, 2))])
    lines = summary.splitlines()
    assert lines[0] == "| task | shots | examples | pre | cpt | random | majority |"
    assert lines[2] == "| sst2 | 0 | 4 (1 too long, left out) | 0.750 | 0.500 | 0.500 | 0.750 |"
    assert lines[3] == "| sst2 | 2 | 4 (1 too long, left out) | 1.000 |  | 0.500 | 0.750 |"
    assert metrics["prompt/cpt/sst2/0shot/accuracy"] == 0.5 and metrics["prompt/sst2/majority_baseline"] == 0.75
    assert "### pre, sst2, 2-shot: accuracy 1.000" in details and "| neg | 1 | 1 |" in details
