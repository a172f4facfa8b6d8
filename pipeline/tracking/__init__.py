"""MLflow tracking: one run per stage execution, with true statuses and sweep parents.

Uses ``MlflowClient`` with explicit run ids rather than the fluent API's global active run, so a
stage, a Lightning logger and a sweep callback can share a store without stepping on each other.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from pipeline.errors import PipelineError, StageKilled

PARENT_RUN_ENV = "PIPELINE_SWEEP_PARENT_RUN_ID"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


@dataclass
class TrackingSettings:
    """Where runs go (conf/tracking/: the ``tracking`` section of the config)."""

    uri: str  # MLflow tracking URI; MLFLOW_TRACKING_URI overrides the default
    experiment: str  # MLflow experiment name
    artifact_location: Optional[str] = None  # for experiments this pipeline creates; None: beside a SQLite store,
    # else the server's default (never MLflow's ./mlruns in the working directory)

    def artifact_uri(self) -> Optional[str]:
        location = self.artifact_location
        if location is None and self.uri.startswith("sqlite:///"):
            location = str(Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts")
        return Path(location).resolve().as_uri() if location else None


def client_for(settings: TrackingSettings):
    from mlflow.tracking import MlflowClient  # mlflow is slow to import; only stages that track pay for it

    return MlflowClient(tracking_uri=settings.uri)


def experiment_id(client, settings: TrackingSettings) -> str:
    """Get or create the experiment; restore it if someone deleted it in the UI."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(settings.experiment)
    if exp is None:
        try:
            return client.create_experiment(settings.experiment, artifact_location=settings.artifact_uri())
        except MlflowException:  # created meanwhile by a concurrent job
            exp = client.get_experiment_by_name(settings.experiment)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists become JSON so each param is one cell."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


class StageRun:
    """The MLflow run of one stage execution."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i:i + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v)[:5000])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Mapping, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def logged_metrics(self, prefix: str) -> dict[str, float]:
        """The latest value of each metric of this run whose name starts with ``prefix`` (a resumed run's earlier ones)."""
        return {k: v for k, v in self.client.get_run(self.run_id).data.metrics.items() if k.startswith(prefix)}


def kill_handler(killed: list[str]):
    """A SIGTERM/SIGINT handler for the process that installs it: record the signal, raise StageKilled.

    Recording matters because a library's cleanup may replace our exception with one of its own
    (datasets' worker pool raises TimeoutError) and the kill must still win. A forked worker that
    inherited the handler just dies as it would by default.
    """
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        killed.append(signal.Signals(signum).name)
        raise StageKilled(killed[-1])

    return handler


@contextmanager
def signal_handler(handler) -> Iterator[None]:
    """Handle SIGTERM and SIGINT with ``handler`` for the block, then restore the previous handlers.

    Only the main thread may install handlers; elsewhere the block runs with whatever is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signals_raise(killed: list[str]):
    return signal_handler(kill_handler(killed))


@contextmanager
def stage_run(settings: TrackingSettings, run_name: str, tags: Mapping[str, str], params: Mapping[str, str],
              parent_run_id: Optional[str] = None, resume_run_id: Optional[str] = None) -> Iterator[StageRun]:
    """Open (or resume) a run; it ends FINISHED, FAILED on an exception, KILLED on SIGTERM/SIGINT.

    Params are logged when the run is created, not again on resume (MLflow forbids changing them).
    """
    client = client_for(settings)
    if resume_run_id is not None:
        previous = client.get_run(resume_run_id)
        if previous.info.experiment_id != experiment_id(client, settings) or \
                previous.data.tags.get("config_hash") != tags.get("config_hash"):
            raise PipelineError(f"cannot resume MLflow run {resume_run_id}: it belongs to another experiment or "
                                f"config (config_hash {previous.data.tags.get('config_hash')} != "
                                f"{tags.get('config_hash')}); remove the checkpoint to start afresh")
        client.update_run(resume_run_id, status="RUNNING")
        run = StageRun(client, resume_run_id)
    else:
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        info = client.create_run(experiment_id(client, settings), run_name=run_name,
                                 tags={k: str(v) for k, v in all_tags.items()}).info
        run = StageRun(client, info.run_id)
        run.log_params(params)
    killed: list[str] = []
    with _signals_raise(killed):
        try:
            yield run
        except (StageKilled, KeyboardInterrupt):
            client.set_terminated(run.run_id, status="KILLED")
            raise
        except BaseException as e:
            if killed:
                client.set_terminated(run.run_id, status="KILLED")
                raise StageKilled(killed[0]) from e
            client.set_tag(run.run_id, "error", f"{type(e).__name__}: {e}"[:5000])
            client.set_terminated(run.run_id, status="FAILED")
            raise
        client.set_terminated(run.run_id, status="FINISHED")
