"""Sweeps in MLflow: a parent run whose children are the jobs (pipeline/sweep.py opens it), read back here."""
from __future__ import annotations

from typing import Optional


def varying(overrides: list[list[str]]) -> list[str]:
    """Each job's overrides that differ between jobs (the swept ones), as "key=value" joined by spaces."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in job) for job in overrides]
    keys = [k for k in dict.fromkeys(k for job in parsed for k in job) if len({job.get(k) for job in parsed}) > 1]
    return [" ".join(f"{k}={job[k]}" for k in keys if k in job) for job in parsed]


def sweep_status(statuses: list[str]) -> str:
    """The parent's status from its children's: any kill or failure shows on the sweep row."""
    if not statuses:
        return "FAILED"
    if "KILLED" in statuses:
        return "KILLED"
    if any(s != "FINISHED" for s in statuses):
        return "FAILED"
    return "FINISHED"


def find_sweep(client, experiment_id: str, stage: str, run_id: Optional[str] = None):
    """A sweep's parent run: the given one, or the newest sweep of ``stage`` in the experiment that ran to its
    end (FINISHED, or FAILED with some jobs failed); a sweep still running or killed part-way is passed
    over while an earlier one ended. None if there is no sweep."""
    if run_id:
        return client.get_run(run_id)
    runs = client.search_runs([experiment_id], f"tags.sweep = 'parent' AND tags.stage = '{stage}'",
                              order_by=["attributes.start_time DESC"], max_results=100)
    # A resumed sweep keeps its first start time: the one that ended last is the newest result.
    ended = sorted((r for r in runs if r.info.status in ("FINISHED", "FAILED")), key=lambda r: r.info.end_time or 0,
                   reverse=True)
    return (ended or runs or [None])[0]


def sweep_jobs(client, parent) -> list:
    """The parent's child runs, in job order; of a job run more than once (a resumed sweep reruns its failed
    jobs), the newest run."""
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=50000)
    newest: dict[str, object] = {}
    for child in sorted(children, key=lambda c: c.info.start_time or 0):
        newest[child.data.tags.get("sweep_job", child.info.run_id)] = child
    return sorted(newest.values(), key=lambda c: int(c.data.tags.get("sweep_job", 0)))
