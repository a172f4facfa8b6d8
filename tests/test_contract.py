"""The stage contract: build aside, manifest last, upstream checks, kills leave the old output."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import PROJECT_ROOT
from pipeline.contract import (MANIFEST, RESUME_STATE, building, execute_stage, read_upstream, resumable_run, stage_lock,
                               write_json, write_manifest)
from pipeline.errors import MissingUpstream, PipelineError
from pipeline.stages import load_stage
from tests.conftest import mlflow_runs, run_cli, web_without_filter


def test_building_publishes_only_a_complete_directory(tmp_path):
    final = tmp_path / "tokenize"
    with building(final) as build:
        (build / "a.bin").write_bytes(b"old")
        write_manifest(build, {"stage": "tokenize", "n": 1})
    assert json.loads((final / MANIFEST).read_text())["n"] == 1

    with pytest.raises(RuntimeError):
        with building(final) as build:
            (build / "a.bin").write_bytes(b"new")
            raise RuntimeError("crashed half-way")
    assert (final / "a.bin").read_bytes() == b"old" and json.loads((final / MANIFEST).read_text())["n"] == 1
    assert not (build / MANIFEST).exists()

    with building(final) as build:  # the next run wipes the leftover partial directory
        assert list(build.iterdir()) == []
        write_manifest(build, {"stage": "tokenize", "n": 2})
    assert json.loads((final / MANIFEST).read_text())["n"] == 2 and not (final / "a.bin").exists()


def test_a_second_run_of_the_same_stage_waits_for_nobody_and_fails_clearly(tmp_path):
    with stage_lock(tmp_path / "tokenize", "tokenize"):
        with pytest.raises(PipelineError, match="another tokenize run is writing"):
            with stage_lock(tmp_path / "tokenize", "tokenize"):
                pass
    with stage_lock(tmp_path / "tokenize", "tokenize"):  # released after the first run
        pass


def test_a_swap_cut_between_its_renames_is_repaired(tmp_path):
    final, old = tmp_path / "tokenize", tmp_path / ".tokenize.old"
    old.mkdir()
    write_manifest(old, {"stage": "tokenize", "n": 1})
    with pytest.raises(RuntimeError):
        with building(final):
            raise RuntimeError("crash")
    assert json.loads((final / MANIFEST).read_text())["n"] == 1 and not old.exists()


def test_missing_upstream_names_the_make_target(tmp_path):
    with pytest.raises(MissingUpstream) as err:
        read_upstream(tmp_path, "demo", "dedup")
    assert str(err.value).endswith("manifest.json is missing: run 'make dedup' first")
    with pytest.raises(MissingUpstream, match="run 'make dedup EXP=paper' first"):
        read_upstream(tmp_path, "paper", "dedup")


def test_cli_missing_upstream_is_one_line(tmp_path, data_dir):
    proc = run_cli("tokenize", f"paths.outputs_dir={tmp_path}", f"paths.data_dir={data_dir}",
                   "+tokenize.sources.deduped={stage: dedup}")
    assert proc.returncode != 0
    assert "demo/dedup/manifest.json is missing: run 'make dedup' first" in proc.stderr
    assert "Traceback" not in proc.stderr


def _fake_upstream(outputs, stage, texts):
    """A finished upstream stage with Parquet kept documents, as filter/dedup publish them."""
    final = outputs / "demo" / stage
    with building(final) as build:
        (build / "kept").mkdir()
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), build / "kept" / "part-0.parquet")
        write_manifest(build, {"stage": stage, "mlflow_run_id": "upstream-run-123"})
    return final


def test_tokenize_reads_an_upstream_stage_and_records_lineage(make_cfg, tmp_path, tracking_uri, experiment):
    outputs = tmp_path / "outputs"
    texts = [f"Document number {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(400)]
    _fake_upstream(outputs, "dedup", texts)
    cfg = make_cfg("~tokenize.sources.shakespeare", "~tokenize.sources.web", "+tokenize.sources.deduped={stage: dedup}",
                   "tokenizer=bytes", "tokenize.val_fraction=0.1")
    manifest = execute_stage("tokenize", load_stage("tokenize"), cfg)
    assert manifest["inputs"]["dedup"]["mlflow_run_id"] == "upstream-run-123"
    assert manifest["counts"]["documents_in"] == 400
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.data.tags["upstream.dedup.run_id"] == "upstream-run-123"
    assert run.data.tags["config_hash"] == manifest["config_hash"]


@pytest.mark.slow
def test_a_killed_stage_leaves_no_manifest_and_the_previous_output_intact(make_cfg, tmp_path, data_dir,
                                                                           tracking_uri, experiment):
    execute_stage("tokenize", load_stage("tokenize"), make_cfg(outputs_dir=tmp_path))  # the previous output
    final = tmp_path / "demo" / "tokenize"
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    # The whole demo corpus takes long enough to be killed in the middle of its work; with the byte tokenizer
    # there is no tokenizer to train before the encoding.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "tokenize", f"paths.outputs_dir={tmp_path}",
                             f"tracking.experiment={experiment}", f"paths.data_dir={data_dir}",
                             *web_without_filter(data_dir), "tokenizer=bytes"],
                            cwd=PROJECT_ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "demo" / ".tokenize.partial"
    deadline = time.time() + 300
    while not (partial / "encoded").exists():  # kill it while datasets' worker pool is encoding
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "KILLED" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert not (partial / MANIFEST).exists()
    statuses = sorted(r.info.status for r in mlflow_runs(tracking_uri, experiment))
    assert statuses == ["FINISHED", "KILLED"]


def test_checkpoints_of_another_config_are_set_aside_beside_a_linked_folder_and_come_back(tmp_path, capsys):
    elsewhere = tmp_path / "other-disk" / "pretrain.ckpt"
    elsewhere.mkdir(parents=True)
    ckpt_dir = tmp_path / "outputs" / "demo" / "pretrain.ckpt"
    ckpt_dir.parent.mkdir(parents=True)
    ckpt_dir.symlink_to(elsewhere)
    write_json(ckpt_dir / RESUME_STATE, {"mlflow_run_id": "run-a", "config_hash": "aaaa"})
    (ckpt_dir / "step-000010.ckpt").write_bytes(b"weights of config a")

    assert resumable_run(ckpt_dir, "bbbb") == (None, "run-a"), "another config: start afresh, end run-a"
    aside = elsewhere.with_name("pretrain.ckpt-aaaa")
    assert (aside / "step-000010.ckpt").read_bytes() == b"weights of config a", "kept, on the linked filesystem"
    assert ckpt_dir.is_symlink() and f"kept them at {aside}" in capsys.readouterr().out
    elsewhere.mkdir()  # what the contract does next: config b's run checkpoints through the same link
    write_json(ckpt_dir / RESUME_STATE, {"mlflow_run_id": "run-b", "config_hash": "bbbb"})

    assert resumable_run(ckpt_dir, "aaaa") == ("run-a", "run-b"), "config a again resumes its own run"
    assert (ckpt_dir / "step-000010.ckpt").read_bytes() == b"weights of config a" and ckpt_dir.is_symlink()
    assert (elsewhere.with_name("pretrain.ckpt-bbbb") / RESUME_STATE).is_file()
