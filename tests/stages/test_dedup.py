"""The dedup stage end to end: JSONL or the filter's output in, kept + removed = input, a FINISHED run."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from mlflow.tracking import MlflowClient

from pipeline.contract import MANIFEST, execute_stage, read_upstream
from pipeline.dedup.evaluate import edit_words
from pipeline.errors import BadInput
from pipeline.stages import load_stage
from tests.conftest import mlflow_runs, run_cli


@pytest.fixture
def documents(tmp_path, data_dir) -> Path:
    """The 20 real CCNet documents, plus a URL twin, an exact copy, an edited copy, an empty and a
    boilerplate-only document, as one JSONL file."""
    rows = []
    for f in sorted((data_dir / "crawl/ccnet_docs").glob("*.jsonl.gz")):
        rows += [json.loads(line) for line in gzip.open(f, "rt", encoding="utf-8")]
    rows = [{"id": r["id"], "url": r["metadata"]["url"], "text": r["text"]} for r in rows]
    rng = np.random.default_rng(0)
    vocabulary = rows[0]["text"].split()
    rows += [{"id": "url-twin", "url": rows[1]["url"] + "#comments", "text": rows[2]["text"] + " (mirror)"},
             {"id": "exact-copy", "url": None, "text": rows[3]["text"].upper()},
             {"id": "near-copy", "url": None, "text": edit_words(rows[4]["text"], 0.003, vocabulary, rng)},
             {"id": "empty", "url": None, "text": "  "}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _table(out: Path, part: str):
    return pads.dataset(sorted((out / part).glob("*.parquet"))).to_table()


@pytest.mark.slow
def test_dedup_stage_accounts_for_every_document(make_cfg, documents, tracking_uri, experiment):
    cfg = make_cfg("dedup.input.stage=null", f"dedup.input.path={documents}", "dedup.eval.enabled=true",
                   "dedup.eval.include_filter_rejected=false", "dedup.eval.min_words=20", "dedup.lines.min_documents=3")
    manifest = execute_stage("dedup", load_stage("dedup"), cfg)
    out = Path(cfg.paths.outputs_dir) / "demo" / "dedup"
    c = manifest["counts"]
    kept, removed = _table(out, "kept"), _table(out, "removed")
    assert c["input"] == 24 == kept.num_rows + removed.num_rows and c["kept"] == kept.num_rows
    by_id = {r["id"]: r for r in removed.to_pylist()}
    ids = [r["id"] for r in json.loads("[" + ",".join(documents.read_text().splitlines()) + "]")]
    assert by_id["url-twin"]["level"] == "url" and by_id["url-twin"]["duplicate_of"] == ids[1]
    assert by_id["exact-copy"]["level"] == "exact" and by_id["exact-copy"]["duplicate_of"] == ids[3]
    assert by_id["near-copy"]["level"] == "near" and by_id["near-copy"]["duplicate_of"] == ids[4]
    assert 0.8 <= by_id["near-copy"]["jaccard"] < 1 and by_id["empty"]["level"] == "empty"
    assert c["removed_by_level"] == {"empty": 1, "url": 1, "exact": 1, "near": 1, "lines": 0}
    assert sum(int(k) * v for k, v in c["cluster_sizes"].items()) == c["kept"] + 3
    assert c["near_eval"]["planted"] > 0 and c["near_eval"]["overall"]["recall"] >= 0.9

    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "dedup"
    m = run.data.metrics
    assert m["dedup/removed/near"] == 1 and m["dedup/kept_documents"] == c["kept"]
    assert 0.9 <= m["dedup_eval/recall"] <= 1 and 0.95 <= m["dedup_eval/precision"] <= 1
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run.info.run_id)}
    assert {"clusters.png", "near_eval.json", "near_detection.png", "boilerplate_lines.json", MANIFEST} <= artifacts


@pytest.mark.slow
def test_dedup_reads_the_filter_output_and_tokenize_reads_dedup(make_cfg, data_dir):
    cfg = make_cfg("++filter.sources.html.max_files=30", "~filter.sources.warc", "dedup.eval.planted=20",
                   "tokenize.sources.web.stage=dedup", "~tokenize.sources.web.path")
    execute_stage("filter", load_stage("filter"), cfg)
    deduped = execute_stage("dedup", load_stage("dedup"), cfg)
    tokenized = execute_stage("tokenize", load_stage("tokenize"), cfg)
    filtered = read_upstream(Path(cfg.paths.outputs_dir), "demo", "filter").manifest
    assert deduped["counts"]["input"] == filtered["counts"]["kept"]
    assert tokenized["counts"]["per_source"]["web"]["train"]["documents"] + \
        tokenized["counts"]["per_source"]["web"]["val"]["documents"] == deduped["counts"]["kept"]
    assert deduped["counts"]["near_eval"]["documents"] > deduped["counts"]["input"]  # the filter's rejects too


@pytest.mark.slow
def test_a_dedup_that_keeps_nothing_says_so_and_tokenize_refuses_its_output(make_cfg, tmp_path, tracking_uri,
                                                                           experiment, capfd):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"id": f"d{i}", "text": " \n" * i}) + "\n" for i in range(3)))
    cfg = make_cfg("dedup.input.stage=null", f"dedup.input.path={blank}", "dedup.eval.enabled=false",
                   "tokenize.sources.web.stage=dedup", "~tokenize.sources.web.path")
    manifest = execute_stage("dedup", load_stage("dedup"), cfg)
    c = manifest["counts"]
    assert c["input"] == 3 and c["kept"] == 0 and c["removed_by_level"]["empty"] == 3
    warning = "kept 0 of 3 documents (empty 3): the corpus is empty; downstream stages will refuse it"
    assert manifest["warnings"] == [warning] and f"dedup: warning: {warning}\n" in capfd.readouterr().err
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.data.tags["warnings"] == warning

    with pytest.raises(BadInput, match=r"^tokenize\.sources\.web: the dedup stage kept 0 of 3 documents \(empty 3\), "
                                       r"so there is nothing to tokenize; see .*/demo/dedup/manifest\.json$"):
        execute_stage("tokenize", load_stage("tokenize"), cfg)


@pytest.mark.slow
def test_make_dedup_eval_tool_and_bad_input_from_the_command_line(tmp_path, documents, tracking_uri, experiment):
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    common = [f"paths.outputs_dir={tmp_path / 'out'}", f"tracking.experiment={experiment}", "dedup.input.stage=null"]
    proc = run_cli("dedup-eval", *common, f"dedup.input.path={documents}", "dedup.eval.min_words=20", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "precision 1.000, recall 1.000" in proc.stdout
    report = json.loads((tmp_path / "out/demo/dedup-eval/near_eval.json").read_text())
    assert report["planted"] == report["documents"] == 23 and report["overall"]["true_pairs"] >= 10
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.data.tags["stage"] == "dedup-eval" and run.info.status == "FINISHED"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "body": "no text field"}\n')
    proc = run_cli("dedup", *common, f"dedup.input.path={bad}", env=env)
    assert proc.returncode != 0
    assert f"{bad} has no string column 'text' (columns: id, body)" in proc.stderr
    assert "Traceback" not in proc.stderr
