"""Shared fixtures: the real data, a real SQLite MLflow store, and the real config shrunk for tests."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from pipeline import PROJECT_ROOT
from pipeline.config import compose

CONF_DIR = str(PROJECT_ROOT / "conf")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (make test does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def nothing_written_outside_tmp_path():
    """No test leaves litter in the project root (an MLflow ./mlruns, Lightning's lightning_logs/)."""
    def entries() -> set[str]:
        return {p.name for p in PROJECT_ROOT.iterdir()} - {".pytest_cache", "__pycache__"}

    before = entries()
    yield
    assert not entries() - before, f"the tests wrote {sorted(entries() - before)} into {PROJECT_ROOT}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data (or PIPELINE_DATA_DIR): the one way tests reach real data."""
    path = Path(os.environ.get("PIPELINE_DATA_DIR", PROJECT_ROOT.parent / "shared" / "data")).resolve()
    assert (path / "SOURCES.md").is_file(), f"the shared data is missing at {path}; set PIPELINE_DATA_DIR"
    return path


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite store per test session (creating MLflow's tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def experiment() -> str:
    """A fresh MLflow experiment name per test, so runs of different tests never mix."""
    return f"test-{uuid.uuid4().hex[:8]}"


def tiny_tokenize_overrides(data_dir: Path) -> list[str]:
    """The demo's tokenize shrunk to seconds: 1,500 speeches of tiny shakespeare and the 20 CCNet web
    documents read directly (not through the filter stage)."""
    return [
        "~tokenize.sources.novels",
        "++tokenize.sources.shakespeare.max_documents=1500",
        *web_without_filter(data_dir),
        f"paths.data_dir={data_dir}",
        "tokenize.val_fraction=0.05",
    ]


def web_without_filter(data_dir: Path) -> list[str]:
    """The demo's tokenize 'web' source read from the 20 CCNet files, not from the filter stage."""
    return ["tokenize.sources.web.stage=null", f"++tokenize.sources.web.path={data_dir}/crawl/ccnet_docs/*.jsonl.gz"]


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory, tracking_uri, data_dir) -> Path:
    """One tiny tokenize output (tiny_tokenize_overrides, vocabulary 512) for the session: an outputs folder whose
    demo/tokenize the training tests read, or link into their own outputs folder with link_tokenize."""
    from pipeline.contract import execute_stage
    from pipeline.stages import load_stage

    out = tmp_path_factory.mktemp("tokenized")
    execute_stage("tokenize", load_stage("tokenize"),
                  compose(f"paths.outputs_dir={out}", f"tracking.uri={tracking_uri}",
                          "tracking.experiment=tokenize-for-training", "tracking.models=false",
                          *tiny_tokenize_overrides(data_dir),
                          "tokenizer.vocab_size=512"))
    return out


def link_tokenize(tokenized: Path, root: Path) -> None:
    """``root``/demo/tokenize: the session's shared tokenize output, read by the stages run into ``root``."""
    (root / "demo").mkdir(parents=True, exist_ok=True)
    os.symlink(tokenized / "demo" / "tokenize", root / "demo" / "tokenize")


def tiny_filter_overrides() -> list[str]:
    """The demo's filter shrunk to seconds: the WARC files, 40 HTML pages and the CCNet documents."""
    return ["++filter.sources.html.max_files=40"]


@pytest.fixture
def make_cfg(tmp_path, tracking_uri, experiment, data_dir):
    """The real config (demo preset, typed) with test outputs, store and overrides."""

    def _compose(*overrides: str, outputs_dir: Path | None = None):
        return compose(
            f"paths.outputs_dir={outputs_dir or tmp_path / 'outputs'}",
            f"tracking.uri={tracking_uri}",
            f"tracking.experiment={experiment}",
            "tracking.models=false",  # registering a model costs seconds: tests/tracking/test_record.py does it
            *tiny_tokenize_overrides(data_dir),
            "tokenizer.vocab_size=512",
            *overrides,
        )

    return _compose


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT_ROOT, env={**os.environ, **(env or {})})


def mlflow_runs(tracking_uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


@contextmanager
def tmpfs(path: Path, size: str):
    """A real small filesystem at ``path`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def sigterm_at(proc: subprocess.Popen, checkpoint: Path, timeout: float = 300) -> str:
    """Wait until the training run ``proc`` has written ``checkpoint``, send it SIGTERM, and return its output
    once it has exited with status 143."""
    import signal
    import time

    deadline = time.time() + timeout
    while not checkpoint.exists():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before writing {checkpoint.name}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    return out


@pytest.fixture
def hub_offline(monkeypatch):
    """Any attempt to reach the Hugging Face Hub fails instead of downloading (transformers, trl)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
