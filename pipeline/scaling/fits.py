"""The laws asked for, fitted to a set of runs, with what the scaling stage publishes: metrics and a report.

``fit_laws`` takes the scaling config's keys as its arguments; ``ScalingFits`` holds every fit and turns
it into MLflow metrics (``kaplan/N/alpha``, ``chinchilla/n_opt/1e21/low``, ``heldout/...``), the Markdown
report (fits.md) and the warnings that say when the runs do not determine the Chinchilla law.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from pipeline.errors import BadInput
from pipeline.scaling.laws import (KAPLAN_PUBLISHED, BootstrapResult, ChinchillaLaw, HeldOut, KaplanFit, Observation,
                                   bootstrap, budget_label, fit_chinchilla_runs, heldout_check, kaplan_fits)


@dataclass
class ScalingFits:
    obs: list[Observation]
    kaplan: dict[str, KaplanFit]  # "N", "D", "C": the Kaplan power laws that could be fitted
    skipped: dict[str, str]  # why the others could not
    chinchilla: Optional[ChinchillaLaw]
    budgets: list[float]  # FLOPs of the compute-optimal allocations
    boot: Optional[BootstrapResult]
    held: Optional[HeldOut]  # fit without the largest run, predict it
    confidence: float
    warnings: list[str] = field(init=False)  # why the Chinchilla law may not be determined (doubts)

    def __post_init__(self):
        self.warnings = doubts(self.chinchilla, self.boot, [o.loss for o in self.obs])

    @property
    def optimum(self) -> bool:
        """Whether a compute-optimal split is reported: a Chinchilla law that falls with both N and D, and budgets."""
        return bool(self.chinchilla and self.chinchilla.has_compute_optimum and self.budgets)

    def metrics(self) -> dict[str, float]:
        metrics = {"scaling/runs": len(self.obs)}
        for key, fit in self.kaplan.items():
            metrics.update({f"kaplan/{key}/alpha": fit.law.alpha, f"kaplan/{key}/x_c": fit.law.x_c,
                            f"kaplan/{key}/alpha_published": KAPLAN_PUBLISHED[key]})
        if self.chinchilla:
            metrics.update({f"chinchilla/{k}": getattr(self.chinchilla, k) for k in ("E", "A", "B", "alpha", "beta")})
            n_opt, d_opt = self.chinchilla.compute_optimal(self.budgets) if self.optimum else ([], [])
            for c, n_c, d_c in zip(self.budgets, n_opt, d_opt):
                metrics.update({f"chinchilla/n_opt/{budget_label(c)}": float(n_c),
                                f"chinchilla/d_opt/{budget_label(c)}": float(d_c)})
        for key, (low, high) in (self.boot.intervals.items() if self.boot else []):
            metrics.update({f"{key}/low": low, f"{key}/high": high})
        held = self.held
        for name, prediction in [("chinchilla", held and held.chinchilla), ("kaplan_n", held and held.kaplan_n)]:
            if prediction:
                metrics.update({f"heldout/{name}/predicted": prediction.predicted, f"heldout/{name}/observed":
                                prediction.observed, f"heldout/{name}/relative_error": prediction.relative_error})
        return metrics

    def counts(self) -> dict:
        return {"kaplan_skipped": self.skipped,
                "bootstrap_failed": self.boot.failed if self.boot else {}}

    def report(self) -> str:
        return fit_report(self)


def fit_laws(obs: Sequence[Observation], laws: Sequence[str], budgets: Sequence[float] = (), bootstrap_reps: int = 200,
             confidence: float = 0.95, huber_delta: float = 1e-3, seed: int = 0) -> ScalingFits:
    """The ``laws`` ("kaplan", "chinchilla") fitted to ``obs``, with ``bootstrap_reps`` resamples for the
    intervals, the compute-optimal N and D at ``budgets`` (none: 10x and 100x the largest run's FLOPs) and,
    from 3 runs, the held-out check."""
    obs = list(obs)
    use_kaplan, use_chinchilla = "kaplan" in laws, "chinchilla" in laws
    kaplan, skipped = kaplan_fits(obs) if use_kaplan else ({}, {})
    chinchilla = fit_chinchilla_runs(obs, delta=huber_delta) if use_chinchilla else None
    if not kaplan and chinchilla is None:
        raise BadInput(f"no scaling law could be fitted to {len(obs)} runs: " + "; ".join(skipped.values()))
    largest_c = max((o.c for o in obs if o.c), default=None)
    budgets = list(budgets) or ([10 * largest_c, 100 * largest_c] if largest_c else [])
    boot = bootstrap(obs, budgets if chinchilla else (), reps=bootstrap_reps, level=confidence, seed=seed,
                     kaplan=use_kaplan, chinchilla=use_chinchilla, start=chinchilla,
                     delta=huber_delta) if bootstrap_reps else None
    held = heldout_check(obs, delta=huber_delta) if len(obs) >= 3 else None
    return ScalingFits(obs, kaplan, skipped, chinchilla, budgets, boot, held, confidence)


# A floor below 1% of every loss changes no fitted loss by more than the noise of a validation loss: E is then
# not determined, only bounded above (the fit reads L = A/N^alpha + B/D^beta).
FLOOR_NOT_DETERMINED = 0.01


def floor_not_determined(chinchilla: ChinchillaLaw, losses: Sequence[float]) -> Optional[str]:
    """Why the runs do not determine E, or None: the fitted floor ran to (nearly) zero."""
    if not losses or chinchilla.log_E >= math.log(FLOOR_NOT_DETERMINED * min(losses)):
        return None
    return (f"E is not determined: the fitted floor ran to zero (E = {chinchilla.E:.3g}, log E = "
            f"{chinchilla.log_E:.4g}, under {FLOOR_NOT_DETERMINED:.0%} of the lowest loss {min(losses):.4g}); "
            "these runs still fall as a power law with no floor in sight, so A, B, alpha, beta and the "
            "compute-optimal split are those of L = A/N^alpha + B/D^beta")


def doubts(chinchilla: Optional[ChinchillaLaw], boot: Optional[BootstrapResult],
           losses: Sequence[float] = ()) -> list[str]:
    """Signs that the Chinchilla law is not determined by these runs (the fit still returns numbers)."""
    if chinchilla is None:
        return []
    out = [f"{k} = {getattr(chinchilla, k):.3g} is outside (0, 2], the range of the paper's starting grid"
           for k in ("alpha", "beta") if not 0 < getattr(chinchilla, k) <= 2]
    if not chinchilla.has_compute_optimum:
        out.append("a law that does not fall with both N and D has no compute-optimal split: none is reported")
    floor = floor_not_determined(chinchilla, losses)
    out += [floor] if floor else []
    for k in ("alpha", "beta", "E"):
        low, high = boot.intervals.get(f"chinchilla/{k}", (0, 0)) if boot else (0, 0)
        if high - low > abs(getattr(chinchilla, k)):
            out.append(f"the {boot.level:.0%} interval of {k} [{low:.3g}, {high:.3g}] is wider than its value")
    if out:
        out.append("so the runs do not determine the Chinchilla law: sweep more sizes and token budgets "
                   "(at least 3 of each), or train longer")
    return out


def _interval(boot: Optional[BootstrapResult], key: str) -> str:
    if boot is None or key not in boot.intervals:
        return ""
    low, high = boot.intervals[key]
    return f"[{low:.4g}, {high:.4g}]"


def fit_report(fits: ScalingFits) -> str:
    """The fits as Markdown: parameters with intervals, the published exponents, the held-out check."""
    kaplan, chinchilla, budgets, boot, held = fits.kaplan, fits.chinchilla, fits.budgets, fits.boot, fits.held
    ci = f"{fits.confidence:.0%} interval"
    lines = [f"# Scaling-law fits on {len(fits.obs)} runs", "", f"| law | parameter | fitted | {ci} | Kaplan et al. 2020 |",
             "|---|---|---|---|---|"]
    for key, fit in kaplan.items():
        lines.append(f"| L({key}) = ({key}_c/{key})^α | α_{key} | {fit.law.alpha:.4g} | "
                     f"{_interval(boot, f'kaplan/{key}/alpha')} | {KAPLAN_PUBLISHED[key]} |")
        lines.append(f"| | {key}_c | {fit.law.x_c:.4g} | {_interval(boot, f'kaplan/{key}/x_c')} | |")
    if chinchilla:
        no_floor = floor_not_determined(chinchilla, [o.loss for o in fits.obs])
        for k in ("E", "A", "B", "alpha", "beta"):
            value = f"{getattr(chinchilla, k):.4g}"
            if k == "E" and no_floor:
                value += f" (log E = {chinchilla.log_E:.4g}): not determined"
            lines.append(f"| L(N, D) = E + A/N^α + B/D^β | {k} | {value} | "
                         f"{_interval(boot, f'chinchilla/{k}')} | |")
    lines += [""] + [f"- {why}" for why in fits.skipped.values()]
    lines += [f"- warning: {w}" for w in fits.warnings]
    lines += ["", "Runs used by each Kaplan fit: " + "; ".join(f"L({k}): {fit.selection}" for k, fit in kaplan.items())
              if kaplan else ""]
    if fits.optimum:
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
