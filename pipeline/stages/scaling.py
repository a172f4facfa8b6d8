"""scaling: fit Kaplan and Chinchilla scaling laws to a sweep's finished runs (from MLflow) or to a CSV.

Each run gives one point: non-embedding parameters N, training tokens D, FLOPs C = 6ND and its final
validation loss. Logged: the fitted parameters with bootstrap intervals, the compute-optimal N and D
for the budgets, a held-out check (fit without the largest run, predict it) and the plots.
"""
from __future__ import annotations

import csv
import json

from omegaconf import DictConfig

from pipeline.config import ScalingConfig, typed
from pipeline.contract import StageContext, StageResult
from pipeline.errors import BadInput, MissingUpstream
from pipeline.scaling.laws import (KAPLAN_PUBLISHED, Observation, bootstrap, budget_label, fit_chinchilla_runs,
                                   heldout_check, kaplan_fits, read_csv)
from pipeline.scaling.plots import plot_parity, plot_scaling
from pipeline.tracking.sweep import find_sweep, sweep_jobs, varying

SECTIONS = ("seed", "scaling")
# What each run must have logged: N, D, C (the training stages log these) and the loss (scaling.loss_metric).
RUN_METRICS = {"n": "model/non_embedding_params", "d": "train/tokens", "c": "train/flops"}


def upstream(cfg: DictConfig) -> list[str]:
    return []  # a sweep's runs live in MLflow, not in a stage directory


def sweep_observations(spec: ScalingConfig, ctx: StageContext, experiment: str) -> tuple[list[Observation], dict]:
    """The finished jobs of the sweep as observations, and what was read (for the manifest)."""
    client = ctx.run.client
    experiment_id = client.get_run(ctx.run.run_id).info.experiment_id
    parent = find_sweep(client, experiment_id, spec.stage, spec.sweep_run_id)
    if parent is None:
        raise MissingUpstream(f"MLflow experiment '{experiment}' has no sweep of the {spec.stage} stage: run "
                              f"'make sweep' first (or set scaling.sweep_run_id, or scaling.csv)")
    jobs = sweep_jobs(client, parent)
    labels = varying([json.loads(j.data.tags.get("sweep_overrides", "[]")) for j in jobs])
    finished = [(j, label) for j, label in zip(jobs, labels) if j.info.status == "FINISHED"]
    left_out = {j.info.run_name: j.info.status for j in jobs if j.info.status != "FINISHED"}
    if left_out:
        print(f"scaling: left out {len(left_out)} unfinished job(s) of sweep {parent.info.run_id}: "
              + ", ".join(f"{name} ({status})" for name, status in left_out.items()))
    keys = [*RUN_METRICS.values(), spec.loss_metric]
    missing = {j.info.run_name: [k for k in keys if k not in j.data.metrics] for j, _ in finished}
    missing = {name: ks for name, ks in missing.items() if ks}
    if missing:
        raise BadInput("; ".join(f"run {name} has no {', '.join(ks)}" for name, ks in missing.items())
                       + f" (sweep {parent.info.run_id}): the fits need N, D, C and the loss of every run")
    obs = [Observation(j.info.run_name, *(j.data.metrics[RUN_METRICS[k]] for k in ("n", "d", "c")),
                       j.data.metrics[spec.loss_metric]) for j, _ in finished]
    read = {"sweep_run_id": parent.info.run_id, "sweep_status": parent.info.status, "left_out": left_out,
            "runs": {j.info.run_name: {"run_id": j.info.run_id, "swept": label} for j, label in finished}}
    return obs, read


def write_observations(obs: list[Observation], path) -> None:
    """The points as a CSV that scaling.csv reads back (to refit, or to fit elsewhere)."""
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["name", "N", "D", "C", "loss"])
        out.writerows([o.name, o.n, o.d, o.c, o.loss] for o in obs)


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    spec = typed(cfg.scaling, ScalingConfig, "scaling")
    if spec.csv:
        obs, read = read_csv(spec.csv), {"csv": spec.csv}
    else:
        obs, read = sweep_observations(spec, ctx, cfg.tracking.experiment)
        ctx.run.set_tags({"upstream.sweep.run_id": read["sweep_run_id"]})
    write_observations(obs, ctx.build_dir / "runs.csv")
    tokens = [o.d for o in obs if o.d]
    print(f"scaling: {len(obs)} runs, N {min(o.n for o in obs):.3g} to {max(o.n for o in obs):.3g}"
          + (f", D {min(tokens):.3g} to {max(tokens):.3g}" if tokens else ""))

    use_kaplan, use_chinchilla = "kaplan" in spec.laws, "chinchilla" in spec.laws
    kaplan, skipped = kaplan_fits(obs) if use_kaplan else ({}, {})
    chinchilla = fit_chinchilla_runs(obs, delta=spec.huber_delta) if use_chinchilla else None
    if not kaplan and chinchilla is None:
        raise BadInput(f"no scaling law could be fitted to {len(obs)} runs: " + "; ".join(skipped.values()))
    largest_c = max((o.c for o in obs if o.c), default=None)
    budgets = list(spec.budgets) or ([10 * largest_c, 100 * largest_c] if largest_c else [])
    boot = bootstrap(obs, budgets if chinchilla else (), reps=spec.bootstrap_reps, level=spec.confidence,
                     seed=cfg.seed, kaplan=use_kaplan, chinchilla=use_chinchilla, start=chinchilla,
                     delta=spec.huber_delta) if spec.bootstrap_reps else None
    held = heldout_check(obs, delta=spec.huber_delta) if len(obs) >= 3 else None

    metrics = {"scaling/runs": len(obs)}
    for key, fit in kaplan.items():
        metrics.update({f"kaplan/{key}/alpha": fit.law.alpha, f"kaplan/{key}/x_c": fit.law.x_c,
                        f"kaplan/{key}/alpha_published": KAPLAN_PUBLISHED[key]})
    if chinchilla:
        metrics.update({f"chinchilla/{k}": getattr(chinchilla, k) for k in ("E", "A", "B", "alpha", "beta")})
        n_opt, d_opt = chinchilla.compute_optimal(budgets)
        for c, n_c, d_c in zip(budgets, n_opt, d_opt):
            metrics.update({f"chinchilla/n_opt/{budget_label(c)}": float(n_c),
                            f"chinchilla/d_opt/{budget_label(c)}": float(d_c)})
    for key, (low, high) in (boot.intervals.items() if boot else []):
        metrics.update({f"{key}/low": low, f"{key}/high": high})
    for name, prediction in [("chinchilla", held and held.chinchilla), ("kaplan_n", held and held.kaplan_n)]:
        if prediction:
            metrics.update({f"heldout/{name}/predicted": prediction.predicted, f"heldout/{name}/observed":
                            prediction.observed, f"heldout/{name}/relative_error": prediction.relative_error})

    plots = [plot_scaling(obs, kaplan, chinchilla, ctx.build_dir / "scaling.png"),
             plot_parity(obs, chinchilla, ctx.build_dir / "parity.png")]
    warnings = doubts(chinchilla, boot)
    if warnings:
        ctx.run.set_tags({"scaling.warning": "; ".join(warnings)})
    report = fit_report(obs, kaplan, skipped, chinchilla, budgets, boot, held, spec.confidence, warnings)
    (ctx.build_dir / "fits.md").write_text(report)
    for path in [*plots, ctx.build_dir / "fits.md", ctx.build_dir / "runs.csv"]:
        ctx.run.log_artifact(path)
    print("\n" + report)
    counts = {"observations": len(obs), **read, "warnings": warnings, "kaplan_skipped": skipped,
              "bootstrap_failed": boot.failed if boot else {}}
    return StageResult(counts=counts, metrics=metrics,
                       outputs={"plot": "scaling.png", "parity": "parity.png", "report": "fits.md", "runs": "runs.csv",
                                "budgets": budgets, "heldout_run": held.name if held else None})


def doubts(chinchilla, boot) -> list[str]:
    """Signs that the Chinchilla law is not determined by these runs (the fit still returns numbers)."""
    if chinchilla is None:
        return []
    out = [f"{k} = {getattr(chinchilla, k):.3g} is outside (0, 2], the range of the paper's starting grid"
           for k in ("alpha", "beta") if not 0 < getattr(chinchilla, k) <= 2]
    for k in ("alpha", "beta", "E"):
        low, high = boot.intervals.get(f"chinchilla/{k}", (0, 0)) if boot else (0, 0)
        if high - low > abs(getattr(chinchilla, k)):
            out.append(f"the {boot.level:.0%} interval of {k} [{low:.3g}, {high:.3g}] is wider than its value")
    if out:
        out.append("so the runs do not determine the Chinchilla law: sweep more sizes and token budgets "
                   "(at least 3 of each), or train longer")
    return out


def _interval(boot, key: str) -> str:
    if boot is None or key not in boot.intervals:
        return ""
    low, high = boot.intervals[key]
    return f"[{low:.4g}, {high:.4g}]"


def fit_report(obs, kaplan, skipped, chinchilla, budgets, boot, held, level: float, warnings: list[str]) -> str:
    """The fits as Markdown: parameters with intervals, the published exponents, the held-out check."""
    ci = f"{level:.0%} interval"
    lines = [f"# Scaling-law fits on {len(obs)} runs", "", f"| law | parameter | fitted | {ci} | Kaplan et al. 2020 |",
             "|---|---|---|---|---|"]
    for key, fit in kaplan.items():
        lines.append(f"| L({key}) = ({key}_c/{key})^α | α_{key} | {fit.law.alpha:.4g} | "
                     f"{_interval(boot, f'kaplan/{key}/alpha')} | {KAPLAN_PUBLISHED[key]} |")
        lines.append(f"| | {key}_c | {fit.law.x_c:.4g} | {_interval(boot, f'kaplan/{key}/x_c')} | |")
    if chinchilla:
        for k in ("E", "A", "B", "alpha", "beta"):
            lines.append(f"| L(N, D) = E + A/N^α + B/D^β | {k} | {getattr(chinchilla, k):.4g} | "
                         f"{_interval(boot, f'chinchilla/{k}')} | |")
    lines += [""] + [f"- {why}" for why in skipped.values()]
    lines += [f"- warning: {w}" for w in warnings]
    lines += ["", "Runs used by each Kaplan fit: " + "; ".join(f"L({k}): {fit.selection}" for k, fit in kaplan.items())
              if kaplan else ""]
    if chinchilla and budgets:
        lines += ["", "## Compute-optimal allocation (Chinchilla fit, C = 6ND)", "",
                  f"| budget C (FLOPs) | N_opt | {ci} | D_opt | {ci} | tokens per parameter |",
                  "|---|---|---|---|---|---|"]
        n_opt, d_opt = chinchilla.compute_optimal(budgets)
        for c, n_c, d_c in zip(budgets, n_opt, d_opt):
            b = budget_label(c)
            lines.append(f"| {c:.3g} | {n_c:.3g} | {_interval(boot, f'chinchilla/n_opt/{b}')} | {d_c:.3g} | "
                         f"{_interval(boot, f'chinchilla/d_opt/{b}')} | {d_c / n_c:.3g} |")
    if held:
        lines += ["", f"## Held-out check: fit without run {held.name} (the largest), predict its loss", "",
                  "| fit | predicted | observed | relative error |", "|---|---|---|---|"]
        for name, p in (("Chinchilla L(N, D)", held.chinchilla), ("Kaplan L(N)", held.kaplan_n)):
            if p:
                lines.append(f"| {name} | {p.predicted:.4f} | {p.observed:.4f} | {p.relative_error:.2%} |")
        lines += [f"- {why}" for why in held.skipped.values()]
    if boot and any(boot.failed.values()):
        lines += ["", f"Bootstrap: {boot.reps} resamples; resamples a fit failed on: "
                  + ", ".join(f"{k} {v}" for k, v in boot.failed.items() if v)]
    return "\n".join(lines) + "\n"
