"""The demo sweep (15 pretrain jobs, conf/sweep/demo.yaml) through Hydra's basic launcher, one job after another
into the local SQLite store (what ``make sweep`` does by default), against the joblib launcher with 2 jobs side by
side, 1 torch thread each, into an MLflow server (``make sweep LAUNCHER=joblib``).

Both sweeps are the real command line (``python -m pipeline pretrain -m +sweep=demo``) on the demo's token shards,
timed from start to exit; the server is started before the candidate's clock starts (a user starts it once).
Reported: the wall-time ratio, each job's losses on both sides (same seeds: the largest relative difference of
any logged train/loss point) and the scaling exponents fitted to each sweep with their bootstrap intervals, which
must agree. One round per side: a full round takes 10 to 15 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import PROJECT_ROOT
from pipeline.bench.pretrain_step import demo_shards, tokenize_dir
from pipeline.config import compose
from pipeline.errors import MissingUpstream

GOAL = 1 / 0.7  # joblib's wall time at most 0.7x the basic launcher's
EXPONENTS = ("kaplan/N/alpha", "kaplan/D/alpha", "chinchilla/alpha", "chinchilla/beta")
QUICK = ["model=tiny", "model.d_model=16,32", "pretrain.max_steps=10,20", "pretrain.eval_every_steps=10",
         "pretrain.eval_windows=8", "pretrain.optim.warmup_steps=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep(root: Path, tokenize: Path, args: list[str], env: dict) -> tuple[float, dict]:
    """Run the sweep into ``root`` (its demo/tokenize a link to the real one): wall seconds and sweep.json."""
    (root / "demo").mkdir(parents=True)
    os.symlink(tokenize, root / "demo" / "tokenize")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "pretrain", "-m", *args, f"paths.outputs_dir={root}"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"the sweep failed ({proc.returncode}): {proc.stderr[-2000:]}")
    (summary,) = root.glob("demo/multirun/pretrain/*/sweep.json")
    return seconds, json.loads(summary.read_text())


def losses(uri: str, summary: dict) -> dict[str, dict]:
    """Each job's train/loss history and final val/loss, by its swept values."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    jobs = {}
    for job in summary["jobs"]:
        run = client.get_run(job["run_id"])
        history = sorted(client.get_metric_history(job["run_id"], "train/loss"), key=lambda m: m.step)
        jobs[job["swept"]] = {"train": [m.value for m in history], "val": run.data.metrics.get("val/loss"),
                              "threads": run.data.tags.get("sweep_job_threads")}
    return jobs


def exponents(root: Path, uri: str, parent: str, quick: bool, overrides: list[str]) -> dict[str, list[float]]:
    """The scaling stage on one sweep: each exponent as [value, low, high]."""
    from pipeline.contract import execute_stage
    from pipeline.stages import load_stage

    laws = ["scaling.laws=[kaplan]", "scaling.bootstrap_reps=20"] if quick else []
    manifest = execute_stage("scaling", load_stage("scaling"), compose(
        f"paths.outputs_dir={root}", f"tracking.uri={uri}", "tracking.experiment=bench-sweep", "tracking.models=false",
        f"scaling.sweep_run_id={parent}", *laws, *overrides))
    m = manifest["metrics"]
    return {k: [m[k], m.get(f"{k}/low", float("nan")), m.get(f"{k}/high", float("nan"))] for k in EXPONENTS if k in m}


def agree(a: list[float], b: list[float]) -> bool:
    """The two bootstrap intervals overlap (a missing interval: the values within 1e-3 of each other)."""
    if any(x != x for x in (*a[1:], *b[1:])):
        return abs(a[0] - b[0]) <= 1e-3 * max(abs(a[0]), abs(b[0]))
    return a[1] <= b[2] and b[1] <= a[2]


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    cfg = compose(*overrides)
    if demo_shards(cfg) is None:
        raise MissingUpstream(f"{tokenize_dir(cfg) / 'manifest.json'} is missing: run 'make tokenize' first")
    tokenize = tokenize_dir(cfg).resolve()
    swept = QUICK if quick else ["+sweep=demo"]
    common = [*swept, "tracking.experiment=bench-sweep", "tracking.models=false", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        base_uri = f"sqlite:///{tmp}/basic.db"
        base_s, base_sweep = sweep(tmp / "basic", tokenize, [*common, f"tracking.uri={base_uri}"], env)

        from pipeline.tracking import TrackingSettings, client_for

        port = free_port()
        server_uri = f"http://127.0.0.1:{port}"
        client_for(TrackingSettings(uri=server_uri, experiment="bench-sweep", server_store=f"sqlite:///{tmp}/server.db",
                                    server_artifacts=str(tmp / "server-artifacts")))  # started before the clock
        pid = int((tmp / f"mlflow-server-{port}.pid").read_text())
        try:
            cand_s, cand_sweep = sweep(tmp / "joblib", tokenize, [
                *common, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "tracking=server",
                f"tracking.uri={server_uri}"], env)
            base_losses, cand_losses = losses(base_uri, base_sweep), losses(server_uri, cand_sweep)
            base_exp = exponents(tmp / "basic", base_uri, base_sweep["parent_run_id"], quick, overrides)
            cand_exp = exponents(tmp / "joblib", server_uri, cand_sweep["parent_run_id"], quick, overrides)
        finally:
            os.killpg(pid, 15)
    diffs = []
    for job, base in base_losses.items():
        cand = cand_losses[job]
        assert len(base["train"]) == len(cand["train"]), f"{job}: different numbers of logged steps"
        diffs += [abs(a - b) / abs(b) for a, b in zip(cand["train"], base["train"])]
    max_rel = max(diffs) if diffs else float("nan")
    agreement = {k: {"basic": base_exp[k], "joblib": cand_exp[k], "agree": agree(base_exp[k], cand_exp[k])}
                 for k in base_exp if k in cand_exp}
    jobs = len(base_sweep["jobs"])
    ratio = base_s / cand_s
    threads = sorted({j["threads"] for j in cand_losses.values()})
    return {
        "name": "sweep_parallel",
        "baseline": {"name": f"basic launcher, {jobs} jobs one after another, SQLite store", "wall_s": round(base_s, 1),
                     "jobs": jobs},
        "candidate": {"name": f"joblib launcher, 2 jobs x {'/'.join(threads)} thread(s), MLflow server",
                      "wall_s": round(cand_s, 1), "jobs": len(cand_sweep["jobs"])},
        "ratio": round(ratio, 3),
        "wall_time_ratio": round(cand_s / base_s, 3),
        "goal": round(GOAL, 3),
        "meets_goal": ratio >= GOAL,
        "losses_max_relative_difference": max_rel,
        "final_val_loss": {job: [base_losses[job]["val"], cand_losses[job]["val"]] for job in base_losses},
        "exponents": agreement,
        "exponents_agree": all(a["agree"] for a in agreement.values()),
        "note": (f"wall time joblib/basic {cand_s / base_s:.2f} (goal <= 0.70); per-job train/loss max relative "
                 f"difference {max_rel:.1e}; exponents agree within their intervals: "
                 f"{all(a['agree'] for a in agreement.values())}"),
    }
