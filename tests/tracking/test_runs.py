"""Stage runs against a real SQLite MLflow store: statuses, params, tags, resume, sweeps."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import StageKilled
from pipeline.tracking import TrackingSettings, flatten, stage_run
from pipeline.tracking.sweep import sweep_status
from tests.conftest import mlflow_runs


def _settings(tracking_uri, experiment, tmp_path):
    return TrackingSettings(uri=tracking_uri, experiment=experiment, artifact_location=str(tmp_path / "art"))


def test_finished_run_has_params_tags_and_artifacts(tracking_uri, experiment, tmp_path):
    params = flatten({"tokenizer": {"vocab_size": 512, "special_tokens": {"chat": ["<a>", "<b>"]}}, "seed": 1})
    with stage_run(_settings(tracking_uri, experiment, tmp_path), "tokenize", {"stage": "tokenize"}, params) as run:
        run.log_metrics({"tokenize/vocab_size": 512})
        run.log_text("hello", "notes.txt")
    (r,) = mlflow_runs(tracking_uri, experiment)
    assert r.info.status == "FINISHED" and r.info.run_name == "tokenize"
    assert r.data.params == {"tokenizer.vocab_size": "512", "tokenizer.special_tokens.chat": '["<a>", "<b>"]',
                             "seed": "1"}
    assert r.data.tags["stage"] == "tokenize" and r.data.metrics["tokenize/vocab_size"] == 512
    assert (tmp_path / "art").exists(), "artifacts go to the configured location, not ./mlruns"
    assert MlflowClient(tracking_uri).download_artifacts(r.info.run_id, "notes.txt", str(tmp_path))


def test_without_an_artifact_location_artifacts_go_beside_the_sqlite_store(tmp_path, monkeypatch, experiment):
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    uri = f"sqlite:///{store}/mlflow.db"
    with stage_run(TrackingSettings(uri=uri, experiment=experiment), "tokenize", {}, {}) as run:
        run.log_text("hello", "notes.txt")
    assert list((store / "mlartifacts").rglob("notes.txt")) and not (tmp_path / "mlruns").exists()


def test_exception_marks_the_run_failed_with_the_error(tracking_uri, experiment, tmp_path):
    with pytest.raises(ValueError):
        with stage_run(_settings(tracking_uri, experiment, tmp_path), "tokenize", {}, {}):
            raise ValueError("bad shard")
    (r,) = mlflow_runs(tracking_uri, experiment)
    assert r.info.status == "FAILED" and "bad shard" in r.data.tags["error"]


def test_keyboard_interrupt_marks_the_run_killed(tracking_uri, experiment, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with stage_run(_settings(tracking_uri, experiment, tmp_path), "tokenize", {}, {}):
            raise KeyboardInterrupt
    (r,) = mlflow_runs(tracking_uri, experiment)
    assert r.info.status == "KILLED"


def test_sigterm_marks_the_run_killed(tracking_uri, experiment, tmp_path):
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import time
        from pipeline.tracking import TrackingSettings, stage_run
        s = TrackingSettings(uri={tracking_uri!r}, experiment={experiment!r}, artifact_location={str(tmp_path)!r})
        with stage_run(s, "tokenize", {{}}, {{}}):
            open({str(ready)!r}, "w").close()
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the subprocess never opened its run"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and StageKilled.__name__ in err
    (r,) = mlflow_runs(tracking_uri, experiment)
    assert r.info.status == "KILLED"


def test_resume_continues_the_same_run_without_relogging_params(tracking_uri, experiment, tmp_path):
    settings = _settings(tracking_uri, experiment, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with stage_run(settings, "pretrain", {}, {"lr": "0.001"}) as run:
            run_id = run.run_id
            raise KeyboardInterrupt
    with stage_run(settings, "pretrain", {}, {"lr": "0.002"}, resume_run_id=run_id) as run:
        run.log_metrics({"train/loss": 1.0}, step=2)
    (r,) = mlflow_runs(tracking_uri, experiment)
    assert r.info.run_id == run_id and r.info.status == "FINISHED" and r.data.params == {"lr": "0.001"}


@pytest.mark.parametrize("statuses, expected", [
    (["FINISHED", "FINISHED"], "FINISHED"),
    (["FINISHED", "FAILED"], "FAILED"),
    (["FINISHED", "KILLED", "FAILED"], "KILLED"),
    (["RUNNING"], "FAILED"),  # a job that died without closing its run
    ([], "FAILED"),
])
def test_sweep_status_reflects_its_jobs(statuses, expected):
    assert sweep_status(statuses) == expected


