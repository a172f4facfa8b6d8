"""A tracking server that does not answer fails a stage at its start, in seconds and one line naming the URI
(MLflow's own retries took 255 s and ended in a 113-line traceback); one that answers anything is used."""
from __future__ import annotations

import http.server
import socket
import threading

import pytest

from pipeline.contract import execute_stage
from pipeline.errors import PipelineError
from pipeline.stages import load_stage
from pipeline.tracking import TrackingSettings, stage_run

UNREACHABLE = "http://127.0.0.1:1"  # port 1: nothing listens, the connection is refused


def test_execute_stage_raises_a_pipeline_error_naming_the_uri(make_cfg):
    cfg = make_cfg(f"tracking.uri={UNREACHABLE}/")
    with pytest.raises(PipelineError, match=r"server at http://127\.0\.0\.1:1/ cannot be reached") as e:
        execute_stage("tokenize", load_stage("tokenize"), cfg)  # not MLflow's MlflowException, minutes later
    assert "\n" not in str(e.value) and "tracking=sqlite" in str(e.value), "one line, with the fix"


def test_a_server_that_accepts_but_never_replies_times_out(tmp_path):
    with socket.socket() as listener:  # the kernel completes the connection; nobody ever reads or writes
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        uri = f"http://user:secret@127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(PipelineError, match=r"cannot be reached \(waited up to 1 s\)") as e:
            with stage_run(TrackingSettings(uri=uri, experiment="x"), "tokenize", {}, {}):
                pass
    assert "secret" not in str(e.value), "the password in the URI is not printed"
    assert f"127.0.0.1:{uri.rsplit(':', 1)[1]}" in str(e.value)


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    import pipeline.tracking as tracking

    monkeypatch.setattr(tracking, "REACHABLE_TIMEOUT_S", 1.0, raising=False)


class NotFound(http.server.BaseHTTPRequestHandler):
    """A server that answers every request with 404 (a proxy, or an MLflow without /health)."""

    paths: list[str] = []

    def do_GET(self):
        NotFound.paths.append(self.path)
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_any_http_reply_counts_as_reachable():
    from pipeline.tracking import check_reachable

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_port}/prefix")
    finally:
        server.shutdown()
        server.server_close()
    assert NotFound.paths == ["/prefix/health"]


@pytest.mark.parametrize("uri", ["sqlite:////nonexistent/mlflow.db", "file:///nonexistent/mlruns", "databricks"])
def test_other_stores_are_left_to_mlflow(uri):
    from pipeline.tracking import check_reachable

    check_reachable(uri)  # no network, no error: MLflow reports these itself
