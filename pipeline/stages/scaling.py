"""scaling: fit Kaplan and Chinchilla scaling laws to a sweep's finished runs (from MLflow) or to a CSV.

Each run gives one point: non-embedding parameters N, training tokens D, FLOPs C = 6ND and its final
validation loss. Logged: the fitted parameters with bootstrap intervals, the compute-optimal N and D
for the budgets, a held-out check (fit without the largest run, predict it) and the plots.
"""
from __future__ import annotations


from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.scaling.fits import fit_laws
from pipeline.scaling.laws import read_csv, write_csv
from pipeline.scaling.plots import plot_parity, plot_scaling
from pipeline.scaling.runs import runs_summary, sweep_observations

SECTIONS = ("seed", "scaling")


def upstream(cfg: StageConfig) -> list[str]:
    return []  # a sweep's runs live in MLflow, not in a stage directory


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    s, out = cfg.scaling, ctx.build_dir
    if s.csv:
        obs, read = read_csv(s.csv), {"csv": s.csv}
    else:
        experiment_id = ctx.run.client.get_run(ctx.run.run_id).info.experiment_id
        obs, read = sweep_observations(ctx.run.client, experiment_id, s.stage, s.sweep_run_id, s.loss_metric)
        ctx.run.set_tags({"upstream.sweep.run_id": read["sweep_run_id"]})
    write_csv(obs, out / "runs.csv")
    print(runs_summary(obs))

    fits = fit_laws(obs, laws=s.laws, budgets=s.budgets, bootstrap_reps=s.bootstrap_reps, confidence=s.confidence,
                    huber_delta=s.huber_delta, seed=cfg.seed)
    report = fits.report()
    (out / "fits.md").write_text(report)
    for path in [plot_scaling(obs, fits.kaplan, fits.chinchilla, out / "scaling.png"),
                 plot_parity(obs, fits.chinchilla, out / "parity.png"), out / "fits.md", out / "runs.csv"]:
        ctx.run.log_artifact(path)
    print("\n" + report)
    return StageResult(counts={"observations": len(obs), **read, **fits.counts()}, metrics=fits.metrics(),
                       outputs={"plot": "scaling.png", "parity": "parity.png", "report": "fits.md", "runs": "runs.csv",
                                "budgets": fits.budgets, "heldout_run": fits.held.name if fits.held else None},
                       warnings=fits.warnings)
