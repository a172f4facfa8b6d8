"""MLflow tracking: one run per stage execution, with true statuses and sweep parents.

Uses ``MlflowClient`` with explicit run ids rather than the fluent API's global active run, so a
stage, a Lightning logger and a sweep callback can share a store without stepping on each other.
"""
from __future__ import annotations

import json
import os
import signal
import sys
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
    energy: bool = True  # codecarbon's offline tracker: energy/kwh and energy/co2_kg of every stage run
    energy_country: str = "USA"  # ISO 3166-1 alpha-3 code of the grid, for codecarbon's carbon-intensity table
    energy_region: Optional[str] = None  # a region of that country codecarbon knows (a US state, a province), or null
    carbon_intensity: Optional[float] = None  # the grid's g CO2e per kWh where known; null: codecarbon's figure
    lineage: bool = True  # each stage's inputs and output as MLflow datasets (the dashboard's Dataset column)
    models: bool = True  # training stages log their transformers export as an MLflow model and register it
    model_name: Optional[str] = None  # the registered model's name; null: the MLflow experiment's
    max_model_mb: float = 2000.0  # a larger export is not logged (its weights would go through the tracking server)
    server_store: Optional[str] = None  # tracking=server: nobody answers at a loopback ``uri``, so start ``mlflow
    # server`` there with this backend store (null: never start one)
    server_artifacts: Optional[str] = None  # and this artifact root (pipeline/tracking/server.py)

    def __post_init__(self):
        from pipeline.errors import ConfigError

        if isinstance(self.energy_country, str):
            self.energy_country = self.energy_country.upper()
        if isinstance(self.energy_country, str) and not (len(self.energy_country) == 3 and self.energy_country.isalpha()):
            raise ConfigError("energy_country", f"is '{self.energy_country}': give a three-letter ISO 3166-1 code "
                                                f"(USA, DEU, FRA ...)")
        if self.carbon_intensity is not None and not self.carbon_intensity >= 0:
            raise ConfigError("carbon_intensity", f"is {self.carbon_intensity}: give g CO2e per kWh (>= 0) or null")

    @property
    def registered_model(self) -> str:
        return self.model_name or self.experiment

    def artifact_uri(self) -> Optional[str]:
        location = self.artifact_location
        if location is None and self.uri.startswith("sqlite:///"):
            location = str(Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts")
        return Path(location).resolve().as_uri() if location else None


REACHABLE_TIMEOUT_S = 5.0
_answered: set[str] = set()  # http(s) tracking URIs whose server answered in this process


def check_reachable(uri: str) -> None:
    """Raise a one-line PipelineError when the http(s) tracking server at ``uri`` does not answer within
    REACHABLE_TIMEOUT_S seconds: MLflow's own retries take minutes to give up, and end in a long traceback.

    Any HTTP reply counts (even 401 or 404): this asks whether a server is there, not whether it is healthy
    or lets us in, which MLflow then reports itself. Other URIs (sqlite, file) are left to MLflow.
    """
    import http.client
    import ssl
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or uri in _answered:
        return
    timeout_s = REACHABLE_TIMEOUT_S
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError as e:  # a port that is not a number
        raise PipelineError(f"tracking.uri names the server {host} with a bad port: {e}") from None
    # Shown and asked without any user:password@ the URI carries.
    shown = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{f':{port}' if port else ''}{parts.path}"
    # TLS is not verified here (MLflow verifies it, with its own CA settings); a proxy from the environment is used.
    context = ssl._create_unverified_context() if parts.scheme == "https" else None
    try:
        with urllib.request.urlopen(f"{shown.rstrip('/')}/health", timeout=timeout_s, context=context):
            pass
    except urllib.error.HTTPError:
        pass  # a server answered
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, ssl.SSLError):
            return  # a TLS server answered (one that wants a client certificate, say): MLflow takes it from here
        raise PipelineError(f"the MLflow tracking server at {shown} cannot be reached (waited up to {timeout_s:g} s) "
                            f"({reason}): start it (mlflow server --host ... --port ...), or set tracking.uri or "
                            f"MLFLOW_TRACKING_URI to one that runs, or use the local store (tracking=sqlite)") from None
    _answered.add(uri)


def client_for(settings: TrackingSettings):
    if settings.server_store and settings.uri not in _answered:
        from pipeline.tracking.server import ensure_server

        ensure_server(settings.uri, settings.server_store, settings.server_artifacts or "mlartifacts")
    check_reachable(settings.uri)
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

    def __init__(self, client, run_id: str, logged_until: Optional[Mapping[str, int]] = None):
        self.client, self.run_id = client, run_id
        # A resumed run: the last step of each metric an earlier execution logged. A run resumed from an
        # earlier checkpoint repeats those steps; they are logged once.
        self.logged_until = dict(logged_until or {})

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None, always: bool = False) -> None:
        """Log at ``step``; a step an earlier execution of a resumed run logged is skipped unless ``always``."""
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if always or (step or 0) > self.logged_until.get(k, -1)]
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
        run = StageRun(client, resume_run_id, last_steps(client, resume_run_id))
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
            _end(client, run.run_id, "KILLED")
            raise
        except BaseException as e:
            if killed:
                _end(client, run.run_id, "KILLED")
                raise StageKilled(killed[0]) from e
            _end(client, run.run_id, "FAILED", f"{type(e).__name__}: {e}")
            raise
        client.set_terminated(run.run_id, status="FINISHED")


def last_steps(client, run_id: str) -> dict[str, int]:
    """The last step each metric of a run was logged at."""
    keys = client.get_run(run_id).data.metrics
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def _end(client, run_id: str, status: str, error: Optional[str] = None) -> None:
    """End a run that is being unwound; if the store cannot be written (its disk is full, say), say so in one
    line and let the original error through."""
    try:
        if error:
            client.set_tag(run_id, "error", error[:5000])
        client.set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - the error that ended the stage matters more
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"could not mark MLflow run {run_id} {status}: {reason}", file=sys.stderr, flush=True)


def end_if_running(settings: TrackingSettings, run_id: str, status: str) -> None:
    """End a run left RUNNING by a process that could not close it (SIGKILL); a run that is gone is ignored."""
    from mlflow.exceptions import MlflowException

    client = client_for(settings)
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
            print(f"marked the interrupted MLflow run {run_id} {status}", flush=True)
    except MlflowException:
        pass
