"""Ctrl-C or SIGTERM ends the filter and dedup stages at once, even while pool workers sit idle.

Each run is set up so that one worker has a long task and the other has finished all the rest and
waits for work, the moment at which multiprocessing.Pool used to hang for good: the stage is
started in a process group of its own, as a terminal starts it, and signalled when that moment
is reached.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import PROJECT_ROOT
from pipeline.contract import MANIFEST
from pipeline.filter.run import CrawlSource, plan_tasks, resolve_inputs
from tests.conftest import mlflow_runs

ENDS_WITHIN_S = 20


def _ccnet(data_dir: Path) -> list[dict]:
    rows = []
    for f in sorted((data_dir / "crawl/ccnet_docs").glob("*.jsonl.gz")):
        rows += [json.loads(line) for line in gzip.open(f, "rt", encoding="utf-8")]
    return rows


class Stage:
    """``python -m pipeline <stage> ...`` in a new process group, its stderr collected as it comes."""

    def __init__(self, *args: str, tracking_uri: str):
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "TQDM_MININTERVAL": "0"}
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.err = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc) -> None:
        """Whatever failed, nothing of the stage keeps running (it is in a session of its own)."""
        if not self.group_is_gone():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.err += chunk

    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def wait_for(self, ready, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the stage ended before the moment came:\n{self.stderr()[-3000:]}"
            assert time.time() < deadline, f"the moment never came:\n{self.stderr()[-3000:]}"
            time.sleep(0.05)

    def signal_and_wait(self, signum: int, group: bool) -> int:
        """Send ``signum`` to the stage's process group (or its main process); its exit status."""
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(ENDS_WITHIN_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{signal.Signals(signum).name} to the {'group' if group else 'main process'}: still running "
                        f"after {ENDS_WITHIN_S} s (SIGKILLed)\n{self.stderr()[-3000:]}")
        self.reader.join(10)
        return code

    def group_is_gone(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False


def _assert_killed(stage: Stage, code: int, signum: int, tracking_uri: str, experiment: str, name: str) -> None:
    err = stage.stderr()
    assert code == 128 + signum, err[-3000:]
    assert "KILLED" in err and "Traceback" not in err, err[-3000:]
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.info.status == "KILLED" and run.data.tags["stage"] == name
    deadline = time.time() + 5
    while not stage.group_is_gone():  # no worker outlives the stage
        assert time.time() < deadline, "worker processes outlived the stage"
        time.sleep(0.1)


# Ctrl-C to filter, SIGTERM to dedup, each to the whole group (both hung). SIGTERM to the main process alone
# never hung; tests/stages/test_pretrain.py and test_contract.py cover it.


@pytest.mark.slow
@pytest.mark.parametrize("signum, group", [pytest.param(signal.SIGINT, True, id="SIGINT-to-group")])
def test_filter_ends_killed_when_signalled_while_a_worker_is_idle(tmp_path, data_dir, tracking_uri, experiment,
                                                                   signum, group):
    rows = _ccnet(data_dir)
    crawl = tmp_path / "crawl"
    (crawl / "slow").mkdir(parents=True)
    (crawl / "fast").mkdir()
    # 1,200 documents (many seconds of work) in one file, a task of its own; four small files after it
    (crawl / "slow/docs.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows * 60))
    for k in range(4):
        (crawl / f"fast/docs-{k}.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:5]))
    sources = {"slow": {"path": str(crawl / "slow")}, "fast": {"path": str(crawl / "fast")}}
    tasks = plan_tasks(resolve_inputs({k: CrawlSource(**v) for k, v in sources.items()}), 2)
    assert len(tasks) >= 2 and [Path(f.path).name for f in tasks[0]] == ["docs.jsonl"], tasks

    only_these = ["~filter.sources.warc", "~filter.sources.html", "~filter.sources.ccnet",
                  *(f"++filter.sources.{name}.path={spec['path']}" for name, spec in sources.items())]
    partial = tmp_path / "outputs/demo/.filter.partial"
    with Stage("filter", f"paths.outputs_dir={tmp_path / 'outputs'}", f"tracking.experiment={experiment}",
               "filter.num_proc=2", *only_these, tracking_uri=tracking_uri) as stage:
        # A task writes its rejected shard last: once every fast task's is there, their worker waits for work.
        stage.wait_for(lambda: all((partial / f"rejected/part-{i:05d}.parquet").exists()
                                   for i in range(1, len(tasks))))
        time.sleep(0.5)
        assert not (partial / "rejected/part-00000.parquet").exists(), "the long task ended too soon to test anything"
        code = stage.signal_and_wait(signum, group)
        _assert_killed(stage, code, signum, tracking_uri, experiment, "filter")
    assert not (tmp_path / "outputs/demo/filter" / MANIFEST).exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum, group", [pytest.param(signal.SIGTERM, True, id="SIGTERM-to-group")])
def test_dedup_ends_killed_when_signalled_while_a_worker_is_idle(tmp_path, data_dir, tracking_uri, experiment,
                                                                  signum, group):
    words = " ".join(r["text"] for r in _ccnet(data_dir)).split()
    rng = np.random.default_rng(0)
    # MinHash tasks are 512 documents: the first holds long ones (seconds of work), three more short ones.
    texts = [" ".join(rng.choice(words, 10000)) for _ in range(512)] + \
            [" ".join(rng.choice(words, 30)) for _ in range(3 * 512)]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))

    with Stage("dedup", f"paths.outputs_dir={tmp_path / 'outputs'}", f"tracking.experiment={experiment}",
               "dedup.input.stage=null", f"dedup.input.path={docs}", "dedup.eval.enabled=false",
               "dedup.near.num_proc=2", tracking_uri=tracking_uri) as stage:
        stage.wait_for(lambda: "1536/2048" in stage.stderr())
        time.sleep(0.5)
        assert "2048/2048" not in stage.stderr(), "the long task ended too soon to test anything"
        code = stage.signal_and_wait(signum, group)
        _assert_killed(stage, code, signum, tracking_uri, experiment, "dedup")
