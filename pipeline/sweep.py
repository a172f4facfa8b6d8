"""Hydra callback: a multirun is one MLflow parent run, and each job's stage run is its child; a job whose
overrides do not compose fails alone.

Jobs run under any Hydra launcher (hydra/launcher=basic, joblib, submitit_local, submitit_slurm, slurm). Before
any job starts, the launcher is checked against the store (jobs side by side need an MLflow server) and the
machine (a SLURM launcher needs sbatch). Running the same sweep command again after it was killed or some jobs
failed resumes it: the same parent run and sweep folder, jobs whose outputs are complete with the same config
hash skipped, a killed training job resumed from its checkpoints.
"""
from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, flag_override
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import PipelineError
from pipeline.tracking import PARENT_RUN_ENV, TrackingSettings, client_for, experiment_id
from pipeline.tracking.sweep import sweep_jobs, sweep_status, varying

# Set (through hydra.job.env_set) for a sweep job whose overrides do not compose; its task raises the message.
JOB_CONFIG_ERROR_ENV = "PIPELINE_JOB_CONFIG_ERROR"
# The torch threads each job may use, so that jobs side by side x threads <= cores (set for the jobs' processes).
JOB_THREADS_ENV = "PIPELINE_JOB_THREADS"
LOCAL_STORES = ("", "file", "sqlite")  # URI schemes of stores that take one writer at a time (""; a bare path)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def launcher_name(config: DictConfig) -> str:
    """The hydra/launcher option chosen (basic, joblib, submitit_local, slurm ...)."""
    return str(OmegaConf.select(config, "hydra.runtime.choices", default={}).get("hydra/launcher", "basic"))


def jobs_at_once(launcher: DictConfig) -> int:
    """How many jobs the launcher runs side by side on this machine: 1 for Hydra's basic launcher, joblib's
    n_jobs (negative counts back from the cores, as joblib does), 0 where it is not bounded here (submitit)."""
    target = str(launcher.get("_target_", ""))
    if target.endswith(".BasicLauncher"):
        return 1
    if "n_jobs" in launcher:
        n = int(launcher.n_jobs)
        return n if n > 0 else max(1, cores() + 1 + n)
    return 0


def threads_per_job(launcher: DictConfig) -> int | None:
    """Torch threads for each job: the cores shared by the jobs joblib runs at once, or submitit's cpus_per_task;
    None for the basic launcher and where the scheduler sets it (SLURM's allocation)."""
    at_once = jobs_at_once(launcher)
    if at_once > 1:
        return max(1, cores() // at_once)
    if str(launcher.get("_target_", "")).endswith(".LocalLauncher") and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    return None


def preflight(config: DictConfig, settings: TrackingSettings) -> None:
    """Refuse, before any job starts, a sweep its launcher cannot run: jobs side by side writing to a SQLite
    store, or a SLURM launcher without sbatch. (An MLflow server that does not answer is named by client_for.)"""
    name, launcher = launcher_name(config), config.hydra.launcher
    slurm = str(launcher.get("_target_", "")).endswith(".SlurmLauncher")
    if slurm and shutil.which("sbatch") is None:
        raise PipelineError(f"hydra/launcher={name} submits the jobs with SLURM's sbatch, which is not on this "
                            f"machine's PATH: run the sweep where SLURM is (a login node), or use "
                            f"hydra/launcher=submitit_local or joblib here")
    from pipeline.tracking.server import loopback

    if slurm and loopback(settings.uri):
        raise PipelineError(f"hydra/launcher={name} runs the jobs on other machines, where {settings.uri} is their "
                            f"own loopback: run the server where they reach it (make mlflow-server MLFLOW_HOST=0.0.0.0) "
                            f"and set tracking.uri=http://<this host>:<port>")
    if jobs_at_once(launcher) != 1 and urlsplit(settings.uri).scheme in LOCAL_STORES:
        raise PipelineError(f"hydra/launcher={name} runs jobs side by side, and the local store {settings.uri} takes "
                            f"one writer at a time: add tracking=server (an MLflow server on this machine, started "
                            f"if none runs; or start one with make mlflow-server)")


def sweep_key(config: DictConfig, stage: str, settings: TrackingSettings) -> str:
    """What makes two sweep commands the same sweep: stage, experiment, command-line overrides, the swept values
    of a sweep preset, and a sweep folder given on the command line."""
    from pipeline.contract import config_hash

    params = OmegaConf.select(config, "hydra.sweeper.params")
    return config_hash({"stage": stage, "experiment": settings.experiment,
                        # where runs are recorded is not what the jobs compute: a sweep resumes on another store
                        "overrides": sorted(o for o in config.hydra.overrides.task
                                            if not o.lstrip("+~").startswith("tracking")),
                        "params": OmegaConf.to_container(params, resolve=True) if params is not None else None,
                        "dir": [o for o in config.hydra.overrides.hydra if o.startswith("hydra.sweep.dir=")]})


def quoted(value: str) -> str:
    """``value`` as a quoted string in Hydra's override grammar, no interpolation (a backslash stays literal
    there unless a quote follows it)."""
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


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


JOB_RECORD = "job.json"  # in each job's folder: how the job ended, as Hydra reported it


def job_record(config: DictConfig) -> Optional[Path]:
    """Where a sweep job's record goes: its folder, written by its rank 0 only (a SLURM job runs a task per
    device, each reporting the job); None outside a sweep."""
    if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
        return None
    from pipeline.contract import distributed_rank

    return Path(config.hydra.runtime.output_dir, JOB_RECORD) if distributed_rank() == 0 else None


def still_running(tags: dict) -> bool:
    """Whether the process a parent run's tags name (sweep_host, sweep_pid) is alive on this host."""
    if tags.get("sweep_host") != socket.gethostname() or not tags.get("sweep_pid", "").isdigit():
        return False
    pid = int(tags["sweep_pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SKIPPED = "skipped: complete with this config"  # what a job's task returns when its output was complete


class SweepParentRun(Callback):
    """Opens the parent run in the launching process; jobs find it through an environment variable.

    Hydra's basic sweeper re-raises a failed job's exception before ``on_multirun_end``, so the
    parent is also closed at interpreter exit.
    """

    def __init__(self) -> None:
        self.settings: Optional[TrackingSettings] = None
        self.run_id: Optional[str] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # First: Hydra reports an exception below as a warning and launches the jobs anyway.
        jobs_fail_alone(GlobalHydra.instance().config_loader())  # the loader the sweeper and launcher compose with
        stage = config.hydra.job.name
        # Hydra turns an exception raised here into a warning and launches the jobs anyway: refuse by exiting.
        try:
            self.settings = settings_from(config)
            preflight(config, self.settings)
            self.run_id = self.open_parent(config, stage)
        except Exception as e:  # noqa: BLE001 - one line, and no job starts
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {stage} sweep: {message}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        os.environ[PARENT_RUN_ENV] = self.run_id
        threads = threads_per_job(config.hydra.launcher)
        if threads:
            os.environ[JOB_THREADS_ENV] = str(threads)
        atexit.register(self.finish)

    def open_parent(self, config: DictConfig, stage: str) -> str:
        """Create the sweep's parent run, or reopen that of the same sweep left unfinished (killed, or with failed
        jobs) and point the sweep at its folder. Returns its run id."""
        client = client_for(self.settings)
        exp_id = experiment_id(client, self.settings)
        self.stage = stage
        key = sweep_key(config, stage, self.settings)
        here = {"launcher": launcher_name(config), "sweep_host": socket.gethostname(), "sweep_pid": str(os.getpid())}
        earlier = client.search_runs([exp_id], f"tags.sweep = 'parent' AND tags.sweep_key = '{key}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if earlier and earlier[0].info.status != "FINISHED" and Path(earlier[0].data.tags.get("sweep_dir", "")).is_dir():
            parent = earlier[0]
            if parent.info.status == "RUNNING" and still_running(parent.data.tags):
                raise PipelineError(f"this sweep is running (MLflow parent run {parent.info.run_id}, pid "
                                    f"{parent.data.tags['sweep_pid']}): wait for it to end, or stop it first")
            self.sweep_dir = Path(parent.data.tags["sweep_dir"])
            with flag_override(config, ["struct", "readonly"], [False, False]):
                config.hydra.sweep.dir = str(self.sweep_dir)  # the sweeper's folder, and through the override
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quoted(str(self.sweep_dir))}")  # the jobs'
            client.update_run(parent.info.run_id, status="RUNNING")
            for tag, value in here.items():
                client.set_tag(parent.info.run_id, tag, value)
            print(f"sweep: resuming the sweep of MLflow parent run {parent.info.run_id} in "
                  f"{os.path.relpath(self.sweep_dir)}: jobs whose outputs are complete are skipped",
                  file=sys.stderr, flush=True)
            return parent.info.run_id
        self.sweep_dir = Path(config.hydra.sweep.dir).absolute()
        run = client.create_run(exp_id, run_name=f"{stage}-sweep",
                                tags={"stage": stage, "sweep": "parent", "sweep_dir": str(self.sweep_dir),
                                      "sweep_key": key, "overrides": " ".join(config.hydra.overrides.task), **here})
        return run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.finish()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A record an earlier execution of a resumed sweep left for this job goes (its outcome is this one's)."""
        record = job_record(config)
        if record is not None:
            record.unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Hydra reports every job here, also one that failed before its MLflow run existed, in the job's process
        (the launching one's for the basic launcher, a worker's for joblib, submitit's job's): the job's record
        goes into its folder, where ``finish`` reads it."""
        path = job_record(config)
        if path is None:
            return
        error = job_return._return_value if job_return.status.name == "FAILED" else None
        skipped = job_return.status.name == "COMPLETED" and job_return._return_value == SKIPPED
        record = {"job": int(config.hydra.job.num), "overrides": list(job_return.overrides or []),
                  "status": job_return.status.name, "skipped": skipped,
                  "error": str(error).splitlines()[0][:500] if error is not None else None,
                  "parent_run_id": os.environ.get(PARENT_RUN_ENV)}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)

    def finish(self) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(JOB_THREADS_ENV, None)
        client = client_for(self.settings)
        parent = client.get_run(run_id)
        children = {c.data.tags.get("sweep_job", c.info.run_id): c for c in sweep_jobs(client, parent)}
        # A killed job never reaches on_job_end, nor a job of an earlier execution of a resumed sweep: their runs
        # still show them.
        recorded = [r for r in (json.loads(p.read_text()) for p in self.sweep_dir.glob(f"*/{JOB_RECORD}"))
                    if r.pop("parent_run_id", None) == run_id]  # not another sweep's, left in a folder given again
        seen = {str(j["job"]) for j in recorded}
        jobs = recorded + [{"job": key, "overrides": json.loads(c.data.tags.get("sweep_overrides", "[]")),
                             "status": c.info.status, "skipped": False, "error": None}
                            for key, c in children.items() if key not in seen]
        jobs.sort(key=lambda j: int(j["job"]) if str(j["job"]).isdigit() else 1 << 30)
        for job, label in zip(jobs, varying([j["overrides"] for j in jobs])):
            child = children.get(str(job["job"]))
            job.update(name=child.info.run_name if child else f"{self.stage}-{job['job']}", swept=label,
                       run_id=child.info.run_id if child else None,
                       run_status=child.info.status if child else "no run")
        failed = [j for j in jobs if j["status"] not in ("COMPLETED", "FINISHED") or j["run_status"] != "FINISHED"]
        status = sweep_status([j["run_status"] if j["status"] in ("COMPLETED", "FINISHED") else "FAILED"
                               if j["run_status"] != "KILLED" else "KILLED" for j in jobs])
        client.log_metric(run_id, "sweep/jobs", len(jobs))
        every = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                   max_results=50000)  # also the earlier attempts of a rerun job
        for key in ("energy/kwh", "energy/co2_kg"):  # what the whole sweep cost: its jobs' sum
            spent = [c.data.metrics[key] for c in every if key in c.data.metrics]
            if spent:
                client.log_metric(run_id, key, sum(spent))
        client.log_metric(run_id, "energy/runs", sum("energy/kwh" in c.data.metrics for c in every))
        client.log_metric(run_id, "sweep/failed_jobs", len(failed))
        client.log_metric(run_id, "sweep/skipped_jobs", sum(j["skipped"] for j in jobs))
        lines = [f"{j['name']}" + (f" ({j['swept']})" if j["swept"] else "") + f": {j['error'] or j['run_status']}"
                 for j in failed]
        if failed:
            client.set_tag(run_id, "failed_jobs", "; ".join(lines)[:5000])
        elif "failed_jobs" in parent.data.tags:  # a resumed sweep whose failed jobs now finished
            client.delete_tag(run_id, "failed_jobs")
        client.set_terminated(run_id, status=status)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.sweep_dir / "sweep.json").write_text(json.dumps({"parent_run_id": run_id, "status": status,
                                                               "jobs": jobs}, indent=1))
        skipped = sum(j["skipped"] for j in jobs)
        print(f"sweep: {len(jobs) - len(failed)} of {len(jobs)} jobs finished"
              + (f" ({skipped} complete before, skipped)" if skipped else "")
              + f" (MLflow parent run {run_id}, {os.path.relpath(self.sweep_dir)})", file=sys.stderr)
        for line in lines:
            print(f"sweep: failed job {line}", file=sys.stderr)
