"""The filter stage end to end on real crawl files plus broken ones: every record is accounted for."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from mlflow.tracking import MlflowClient

from pipeline import PROJECT_ROOT
from pipeline.contract import MANIFEST, execute_stage
from pipeline.errors import BadInput
from pipeline.filter.run import CrawlSource
from pipeline.stages import load_stage
from tests.conftest import mlflow_runs, run_cli

ENGLISH = ("The town council met on Tuesday evening to review the plan for the new library. Members agreed that "
           "the budget should be cut, and that the work would start in spring with a small team of builders. "
           "They asked for a report on the costs of the first phase, and they wanted to have it before the next "
           "meeting. The chair said that the report would be ready in two weeks, with a summary for the public. "
           "Residents who want to comment can write to the clerk at clerk.office@example.org before the end of "
           "the month. The café next to the old hall will stay open while the work goes on.")


@pytest.fixture
def crawl(tmp_path, data_dir) -> dict:
    """Real WARC and HTML files, and broken ones: truncated, empty, binary junk, a mislabelled charset."""
    warc = tmp_path / "crawl" / "warc"
    warc.mkdir(parents=True)
    shutil.copy(data_dir / "crawl/warc/dolma/sample-0000.warc.gz", warc / "a.warc.gz")
    (warc / "b-truncated.warc.gz").write_bytes((data_dir / "crawl/warc/dolma/sample-0001.warc.gz").read_bytes()[:90_000])
    (warc / "c-empty.warc.gz").write_bytes(b"")
    bad = tmp_path / "crawl" / "pages"
    bad.mkdir()
    (bad / "junk.html").write_bytes(bytes(range(128, 256)) * 40)
    # Latin-1 bytes under a page that claims UTF-8: decoded by detection, not rejected
    (bad / "latin1.html").write_bytes(
        f'<html><head><meta charset="utf-8"></head><body><article><p>{ENGLISH}</p></article></body></html>'
        .encode("latin-1"))
    return {
        "warc": {"path": str(warc / "*.warc.gz")},
        "pages": {"path": str(bad)},
        "html": {"path": f"{data_dir}/crawl/html/trafilatura/cache/*.html.gz", "max_files": 25,
                 "url_index": f"{data_dir}/crawl/index.jsonl"},
        "ccnet": {"path": f"{data_dir}/crawl/ccnet_docs/*.jsonl.gz"},
    }


def _cfg(make_cfg, crawl, *overrides, outputs_dir=None):
    cfg = make_cfg("filter.urls.optout=[semanticscholar.org]", *overrides, outputs_dir=outputs_dir)
    cfg.filter.sources = {name: CrawlSource(**spec) for name, spec in crawl.items()}
    return cfg


def _table(out: Path, part: str):
    return pads.dataset(sorted((out / part).glob("*.parquet"))).to_table()


@pytest.mark.slow
def test_every_record_is_kept_or_rejected_with_its_rule(make_cfg, crawl, tracking_uri, experiment):
    cfg = _cfg(make_cfg, crawl)
    manifest = execute_stage("filter", load_stage("filter"), cfg)
    out = Path(cfg.paths.outputs_dir) / "demo" / "filter"
    assert json.loads((out / MANIFEST).read_text())["counts"] == json.loads(json.dumps(manifest["counts"]))
    kept, rejected = _table(out, "kept"), _table(out, "rejected")
    c = manifest["counts"]
    assert c["kept"] == kept.num_rows > 20 and c["rejected"] == rejected.num_rows
    for name, s in c["per_source"].items():
        assert s["kept"] + s["rejected"] == s["input"] > 0, name
        assert kept["source"].to_pylist().count(name) == s["kept"]
    ids = kept["id"].to_pylist() + rejected["id"].to_pylist()
    assert len(set(ids)) == len(ids), "document ids are unique"

    rows = rejected.to_pylist()
    by_file = {}
    for r in rows:
        by_file.setdefault(Path(r["file"]).name, []).append(r)
    assert by_file["b-truncated.warc.gz"][-1]["rule"] == "read.truncated"
    assert [r["rule"] for r in by_file["c-empty.warc.gz"]] == ["read.empty_file"]
    (junk,) = by_file["junk.html"]
    assert junk["rule"] == "extract.undecodable" and junk["raw"] == bytes(range(128, 256)) * 40, "raw bytes kept"
    optout = [r for r in rows if r["rule"] == "urls.optout"]
    assert optout and all("semanticscholar.org" in r["url"] for r in optout)
    assert all(r["step"] == r["rule"].split(".")[0] for r in rows)
    gopher = [r for r in rows if r["step"] == "gopher"]
    assert gopher and all(r["value"] is not None and r["limit"] is not None for r in gopher)

    texts = dict(zip([Path(f).name for f in kept["file"].to_pylist()], kept["text"].to_pylist()))
    assert "café" in texts["latin1.html"] and "<EMAIL>" in texts["latin1.html"]
    assert "clerk.office@example.org" not in "".join(kept["text"].to_pylist())
    assert c["pii_redacted"]["email"] >= 1
    assert all(lang == "en" for lang in kept["lang"].to_pylist())
    funnel = c["funnel"]
    assert funnel["input"] == c["kept"] + c["rejected"] and funnel["toxicity"] == c["kept"]
    assert list(funnel.values()) == sorted(funnel.values(), reverse=True)

    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "filter"
    assert run.data.metrics["filter/removed/urls.optout"] == len(optout)
    assert run.data.metrics["filter/kept_documents"] == c["kept"]
    lines = c["c4_lines_removed"]  # C4's line rules removed menu and link lines from the real pages
    assert lines["no_end_mark"] > 0 and run.data.metrics["filter/c4_lines_removed/no_end_mark"] == lines["no_end_mark"]
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run.info.run_id)}
    assert {"funnel.png", "rejected_samples.json", MANIFEST} <= artifacts
    samples = json.loads((out / "rejected_samples.json").read_text())
    assert set(samples) == set(c["rejected_by_rule"]) and all(0 < len(v) <= 20 for v in samples.values())

    inspect = subprocess.run([sys.executable, "-m", "pipeline.filter.inspect", str(out), "--rule", "read."],
                             capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert inspect.returncode == 0 and "=== read.truncated: 1 rejected" in inspect.stdout
    assert "langid" not in inspect.stdout


@pytest.mark.slow
def test_output_does_not_depend_on_num_proc(make_cfg, crawl, tmp_path):
    results = []
    for n in (1, 2):
        cfg = _cfg(make_cfg, crawl, f"filter.num_proc={n}", outputs_dir=tmp_path / f"out{n}")
        manifest = execute_stage("filter", load_stage("filter"), cfg)
        kept = _table(Path(cfg.paths.outputs_dir) / "demo" / "filter", "kept")
        results.append((manifest["counts"]["per_source"], sorted(kept["id"].to_pylist())))
    assert results[0] == results[1]


@pytest.mark.slow
def test_tokenize_reads_the_filter_output(make_cfg, crawl):
    cfg = _cfg(make_cfg, crawl, "tokenize.sources.web.stage=filter", "tokenize.sources.web.path=null")
    filtered = execute_stage("filter", load_stage("filter"), cfg)
    tokenized = execute_stage("tokenize", load_stage("tokenize"), cfg)
    assert tokenized["counts"]["per_source"]["web"]["train"]["documents"] + \
        tokenized["counts"]["per_source"]["web"]["val"]["documents"] == filtered["counts"]["kept"]
    assert tokenized["inputs"]["filter"]["mlflow_run_id"] == filtered["mlflow_run_id"]


@pytest.mark.slow
def test_a_filter_that_keeps_nothing_says_so_and_tokenize_refuses_its_output(make_cfg, tracking_uri, experiment,
                                                                            capfd):
    cfg = make_cfg("~filter.sources.warc", "~filter.sources.html", "filter.langid.languages=[sw]",
                   "tokenize.sources.web.stage=filter", "~tokenize.sources.web.path")
    manifest = execute_stage("filter", load_stage("filter"), cfg)
    c = manifest["counts"]
    assert c["input"] == 20 and c["kept"] == 0 and c["rejected_by_rule"] == {"langid.language": 20}
    warning = ("kept 0 of 20 documents (langid.language 20): the corpus is empty and downstream stages will "
               "refuse it; rejected_samples.json shows why")
    assert manifest["warnings"] == [warning] and f"filter: warning: {warning}\n" in capfd.readouterr().err
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.data.tags["warnings"] == warning and run.data.metrics["filter/kept_documents"] == 0

    out = Path(cfg.paths.outputs_dir) / "demo"
    with pytest.raises(BadInput) as e:  # shakespeare has text; the web source is what is empty
        execute_stage("tokenize", load_stage("tokenize"), cfg)
    assert str(e.value) == (f"tokenize.sources.web: the filter stage kept 0 of 20 documents (langid.language 20), "
                            f"so there is nothing to tokenize; see {out / 'filter' / MANIFEST}")
    assert not (out / "tokenize").exists() and not (out / ".tokenize.partial" / "tokenizer.json").exists()


def test_a_missing_input_path_fails_at_once_naming_it(tmp_path, tracking_uri):
    proc = run_cli("filter", f"paths.outputs_dir={tmp_path}", f"tracking.uri={tracking_uri}",
                   "filter.sources.html.path=/nonexistent/pages/*.html")
    assert proc.returncode != 0
    assert "filter.sources.html: no files match /nonexistent/pages/*.html" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "demo" / "filter" / MANIFEST).exists()
