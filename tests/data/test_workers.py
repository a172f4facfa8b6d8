"""The data stages' worker pool: results, errors and dead workers arrive; a signal to the group ends it at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline import PROJECT_ROOT
from pipeline.data.workers import RemoteTraceback, WorkerPool
from pipeline.errors import BadInput


def _square(x: int) -> int:
    return x * x


def _refuse(name: str) -> None:
    raise BadInput(f"{name} is not a readable file")


def _die(_) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_every_result_arrives_and_map_keeps_the_order():
    with WorkerPool(2) as pool:
        assert pool.map(_square, range(20)) == [x * x for x in range(20)]
        assert sorted(pool.imap_unordered(_square, range(7))) == [x * x for x in range(7)]
        assert pool.map(_square, []) == []


def test_an_error_in_a_worker_arrives_with_its_type_and_traceback():
    with pytest.raises(BadInput, match="a.parquet is not a readable file") as caught:
        with WorkerPool(2) as pool:
            pool.map(_refuse, ["a.parquet"])
    assert isinstance(caught.value.__cause__, RemoteTraceback) and "_refuse" in str(caught.value.__cause__)


def test_a_worker_that_dies_fails_the_call_instead_of_hanging():
    with pytest.raises(RuntimeError, match=r"died \(exit code -9; killed"):
        with WorkerPool(2) as pool:
            pool.map(_die, [1])


SCRIPT = """
import sys, time
from pipeline.data.workers import WorkerPool
from pipeline.errors import StageKilled
from pipeline.tracking import kill_handler, signal_handler

def work(seconds):
    time.sleep(seconds)
    return seconds

with signal_handler(kill_handler([])):
    try:
        with WorkerPool(2) as pool:
            for n, _ in enumerate(pool.imap_unordered(work, [60, 0, 0, 0]), 1):
                if n == 3:  # one worker sleeps, the other has nothing left to do
                    print("ready", flush=True)
    except StageKilled as e:
        print(e, flush=True)
        sys.exit(128 + (2 if e.signal_name == "SIGINT" else 15))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_ends_the_pool_at_once(tmp_path, signum):
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.3)  # the idle worker is back waiting for a task
        os.killpg(proc.pid, signum)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum and f"killed by {signal.Signals(signum).name}" in out
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # the workers went with it
        os.killpg(proc.pid, 0)


def test_workers_die_with_a_parent_killed_by_sigkill(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        assert proc.stdout.readline() == "ready\n"  # one worker is 60 s into a task
        proc.kill()
        proc.wait(10)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break  # no worker outlives it (and holds the stage's lock)
            time.sleep(0.1)
        else:
            pytest.fail("a worker outlived its parent's SIGKILL")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
