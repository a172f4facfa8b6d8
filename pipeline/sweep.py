"""Hydra callback: a multirun is one MLflow parent run, and each job's stage run is its child; a job whose
overrides do not compose fails alone."""
from __future__ import annotations

import atexit
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, flag_override
from omegaconf.errors import OmegaConfBaseException

from pipeline.tracking import PARENT_RUN_ENV, TrackingSettings, client_for, experiment_id
from pipeline.tracking.sweep import sweep_status, varying

# Set (through hydra.job.env_set) for a sweep job whose overrides do not compose; its task raises the message.
JOB_CONFIG_ERROR_ENV = "PIPELINE_JOB_CONFIG_ERROR"


def settings_from(cfg: DictConfig) -> TrackingSettings:
    return OmegaConf.to_object(cfg.tracking)


def composition_error(error: Exception) -> str:
    """One line naming the key: "config key 'pretrain.max_steps': Value 'abc' of type 'str' could not be ..."."""
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    key = getattr(cause, "full_key", None)
    if key and str(cause).strip():
        return f"config key '{key}': {str(cause).strip().splitlines()[0]}"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def jobs_fail_alone(config_loader) -> None:
    """Make a sweep job whose overrides do not compose (a swept value of the wrong type, ``pretrain.max_steps=abc``)
    fail on its own while the other jobs run.

    Hydra composes every job's config before launching any (and again as it launches each), and one value that
    fails to compose stopped the whole sweep. Here such a job gets the sweep's config with its own overrides and
    the error in ``hydra.job.env_set``: the launcher starts it like any job, its task raises the error, and it is
    reported like any failed job (on_job_end, sweep.json).
    """
    compose = config_loader.load_sweep_config

    def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        try:
            return compose(master_config, sweep_overrides)
        except (ConfigCompositionException, OmegaConfBaseException) as e:
            job = copy.deepcopy(master_config)
            OmegaConf.copy_cache(from_config=master_config, to_config=job)  # the same ${now:} as the other jobs
            with flag_override(job, ["struct", "readonly"], [False, False]):
                job.hydra.overrides.task = list(sweep_overrides)
                # escaped: OmegaConf resolves env_set, and the message may quote an ${interpolation}
                job.hydra.job.env_set[JOB_CONFIG_ERROR_ENV] = composition_error(e).replace("${", "\\${")
            return job

    config_loader.load_sweep_config = load_sweep_config


class SweepParentRun(Callback):
    """Opens the parent run in the launching process; jobs find it through an environment variable.

    Hydra's basic sweeper re-raises a failed job's exception before ``on_multirun_end``, so the
    parent is also closed at interpreter exit.
    """

    def __init__(self) -> None:
        self.settings: Optional[TrackingSettings] = None
        self.run_id: Optional[str] = None
        self.jobs: list[dict] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # First: Hydra reports an exception below as a warning and launches the jobs anyway.
        jobs_fail_alone(GlobalHydra.instance().config_loader())  # the loader the sweeper and launcher compose with
        self.settings = settings_from(config)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.stage = config.hydra.job.name
        self.jobs = []
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

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Hydra reports every job here, also one that failed before its MLflow run existed.
        if self.run_id is None:  # a single run, not a sweep
            return
        error = job_return._return_value if job_return.status.name == "FAILED" else None
        self.jobs.append({"job": int(config.hydra.job.num), "overrides": list(job_return.overrides or []),
                          "status": job_return.status.name,
                          "error": str(error).splitlines()[0][:500] if error is not None else None})

    def finish(self) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        os.environ.pop(PARENT_RUN_ENV, None)
        client = client_for(self.settings)
        parent = client.get_run(run_id)
        children = {c.data.tags.get("sweep_job", c.info.run_id): c for c in
                    client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")}
        # A killed job never reaches on_job_end: its run still shows it.
        seen = {str(j["job"]) for j in self.jobs}
        jobs = self.jobs + [{"job": key, "overrides": json.loads(c.data.tags.get("sweep_overrides", "[]")),
                             "status": c.info.status, "error": None} for key, c in children.items() if key not in seen]
        for job, label in zip(jobs, varying([j["overrides"] for j in jobs])):
            child = children.get(str(job["job"]))
            job.update(name=child.info.run_name if child else f"{self.stage}-{job['job']}", swept=label,
                       run_id=child.info.run_id if child else None,
                       run_status=child.info.status if child else "no run")
        failed = [j for j in jobs if j["status"] not in ("COMPLETED", "FINISHED") or j["run_status"] != "FINISHED"]
        status = sweep_status([j["run_status"] if j["status"] in ("COMPLETED", "FINISHED") else "FAILED"
                               if j["run_status"] != "KILLED" else "KILLED" for j in jobs])
        client.log_metric(run_id, "sweep/jobs", len(jobs))
        for key in ("energy/kwh", "energy/co2_kg"):  # what the whole sweep cost: its jobs' sum
            spent = [c.data.metrics[key] for c in children.values() if key in c.data.metrics]
            if spent:
                client.log_metric(run_id, key, sum(spent))
        client.log_metric(run_id, "energy/runs", sum("energy/kwh" in c.data.metrics for c in children.values()))
        client.log_metric(run_id, "sweep/failed_jobs", len(failed))
        lines = [f"{j['name']}" + (f" ({j['swept']})" if j["swept"] else "") + f": {j['error'] or j['run_status']}"
                 for j in failed]
        if failed:
            client.set_tag(run_id, "failed_jobs", "; ".join(lines)[:5000])
        client.set_terminated(run_id, status=status)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.sweep_dir / "sweep.json").write_text(json.dumps({"parent_run_id": run_id, "status": status,
                                                               "jobs": jobs}, indent=1))
        print(f"sweep: {len(jobs) - len(failed)} of {len(jobs)} jobs finished (MLflow parent run {run_id}, "
              f"{os.path.relpath(self.sweep_dir)})", file=sys.stderr)
        for line in lines:
            print(f"sweep: failed job {line}", file=sys.stderr)
