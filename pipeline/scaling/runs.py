"""Observations from a sweep's runs in MLflow: N, D, C and the final loss of each finished job."""
from __future__ import annotations

import json
from typing import Optional, Sequence

from pipeline.errors import BadInput, MissingUpstream
from pipeline.scaling.laws import Observation
from pipeline.tracking.sweep import find_sweep, sweep_jobs, varying

# What each run must have logged: N, D, C (the training stages log these) and the loss (scaling.loss_metric).
RUN_METRICS = {"n": "model/non_embedding_params", "d": "train/tokens", "c": "train/flops"}


def sweep_observations(client, experiment_id: str, stage: str = "pretrain", sweep_run_id: Optional[str] = None,
                       loss_metric: str = "val/loss") -> tuple[list[Observation], dict]:
    """The finished jobs of a sweep of ``stage`` (``sweep_run_id``, or the newest) as observations, and what
    was read (for the manifest); unfinished jobs are left out and named."""
    parent = find_sweep(client, experiment_id, stage, sweep_run_id)
    if parent is None:
        raise MissingUpstream(f"MLflow experiment '{client.get_experiment(experiment_id).name}' has no sweep of the "
                              f"{stage} stage: run 'make sweep' first (or set scaling.sweep_run_id, or scaling.csv)")
    jobs = sweep_jobs(client, parent)
    labels = varying([json.loads(j.data.tags.get("sweep_overrides", "[]")) for j in jobs])
    finished = [(j, label) for j, label in zip(jobs, labels) if j.info.status == "FINISHED"]
    left_out = {j.info.run_name: j.info.status for j in jobs if j.info.status != "FINISHED"}
    if left_out:
        print(f"scaling: left out {len(left_out)} unfinished job(s) of sweep {parent.info.run_id}: "
              + ", ".join(f"{name} ({status})" for name, status in left_out.items()))
    keys = [*RUN_METRICS.values(), loss_metric]
    missing = {j.info.run_name: [k for k in keys if k not in j.data.metrics] for j, _ in finished}
    missing = {name: ks for name, ks in missing.items() if ks}
    if missing:
        raise BadInput("; ".join(f"run {name} has no {', '.join(ks)}" for name, ks in missing.items())
                       + f" (sweep {parent.info.run_id}): the fits need N, D, C and the loss of every run")
    obs = [Observation(j.info.run_name, *(j.data.metrics[RUN_METRICS[k]] for k in ("n", "d", "c")),
                       j.data.metrics[loss_metric]) for j, _ in finished]
    read = {"sweep_run_id": parent.info.run_id, "sweep_status": parent.info.status, "left_out": left_out,
            "runs": {j.info.run_name: {"run_id": j.info.run_id, "swept": label} for j, label in finished}}
    return obs, read


def runs_summary(obs: Sequence[Observation]) -> str:
    """One line: how many runs, and the range of N and D they span."""
    tokens = [o.d for o in obs if o.d]
    return (f"scaling: {len(obs)} runs, N {min(o.n for o in obs):.3g} to {max(o.n for o in obs):.3g}"
            + (f", D {min(tokens):.3g} to {max(tokens):.3g}" if tokens else ""))
