"""Hydra callback: a multirun is one MLflow parent run, and each job's stage run is its child."""
from __future__ import annotations

import atexit
import os
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.tracking import PARENT_RUN_ENV, TrackingSettings, client_for, experiment_id


def settings_from(cfg: DictConfig) -> TrackingSettings:
    return TrackingSettings(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                            artifact_location=cfg.tracking.artifact_location)


def sweep_status(statuses: list[str]) -> str:
    """The parent's status from its children's: any kill or failure shows on the sweep row."""
    if not statuses:
        return "FAILED"
    if "KILLED" in statuses:
        return "KILLED"
    if any(s != "FINISHED" for s in statuses):
        return "FAILED"
    return "FINISHED"


class SweepParentRun(Callback):
    """Opens the parent run in the launching process; jobs find it through an environment variable.

    Hydra's basic sweeper re-raises a failed job's exception before ``on_multirun_end``, so the
    parent is also closed at interpreter exit.
    """

    def __init__(self) -> None:
        self.settings: Optional[TrackingSettings] = None
        self.run_id: Optional[str] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.settings = settings_from(config)
        client = client_for(self.settings)
        stage = config.hydra.job.name
        overrides = list(config.hydra.overrides.task)
        run = client.create_run(experiment_id(client, self.settings), run_name=f"{stage}-sweep",
                                tags={"stage": stage, "sweep": "parent", "sweep_dir": str(config.hydra.sweep.dir),
                                      "overrides": " ".join(overrides)})
        self.run_id = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.run_id
        atexit.register(self.finish)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.finish()

    def finish(self) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        os.environ.pop(PARENT_RUN_ENV, None)
        client = client_for(self.settings)
        parent = client.get_run(run_id)
        children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        statuses = [c.info.status for c in children]
        failed = sorted(c.info.run_name for c in children if c.info.status != "FINISHED")
        client.log_metric(run_id, "sweep/jobs", len(children))
        client.log_metric(run_id, "sweep/failed_jobs", len(failed))
        if failed:
            client.set_tag(run_id, "failed_jobs", ", ".join(failed))
        client.set_terminated(run_id, status=sweep_status(statuses))
