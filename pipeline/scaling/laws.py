"""Scaling laws fitted to finished runs.

Kaplan et al. (2020): one power law L(X) = (X_c / X)^alpha per resource X in {N, D, C}, each fitted on the
runs that X limits. Hoffmann et al. (2022, "Chinchilla"): L(N, D) = E + A / N^alpha + B / D^beta, fitted by
minimising a Huber loss on log-loss from a grid of starts, which gives the compute-optimal split of a budget
C = 6 N D. Bootstrap resampling turns every fitted number into an interval; a held-out check says how well
the fits extrapolate to the largest run.

N counts non-embedding parameters, D training tokens, C training FLOPs, loss is in nats per token.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

from pipeline.errors import BadInput

KAPLAN_PUBLISHED = {"N": 0.076, "D": 0.095, "C": 0.057}  # Kaplan et al. 2020, eqs. 1.1-1.3 (C: 0.050 for C_min)
CHINCHILLA_PARAMETERS = 5
FIELD_LABELS = {"n": "N", "d": "D", "c": "C", "loss": "loss"}


@dataclass(frozen=True)
class Observation:
    """One finished run (or one row of a published table)."""

    name: str
    n: float  # non-embedding parameters
    d: float | None  # training tokens
    c: float | None  # training FLOPs
    loss: float  # final validation loss, nats/token


def complete(obs: Observation) -> Observation:
    """The observation with C = 6 N D or D = C / (6 N) filled in when only one of them is known."""
    if obs.c is None and obs.d is not None:
        return replace(obs, c=6.0 * obs.n * obs.d)
    if obs.d is None and obs.c is not None:
        return replace(obs, d=obs.c / (6.0 * obs.n))
    return obs


def runs_phrase(names: Sequence[str], limit: int = 8) -> str:
    """'run a' or 'runs a, b, c', cut after ``limit`` names so a message stays one line."""
    names = list(names)
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"run {shown}" if len(names) == 1 else f"runs {shown}"


def missing(name: str, keys: Sequence[str]) -> BadInput:
    """The error (to raise) for a run that lacks metrics the fits need."""
    return BadInput(f"run {name} has no {', '.join(keys)}: it did not finish or did not log it; "
                    "rerun it or leave it out of the sweep")


def check_observations(obs: Sequence[Observation], need: int, what: str,
                       labels: Mapping[str, str] | None = None) -> None:
    """Raise BadInput naming the runs whose loss/N/D/C is non-finite or not positive, or when fewer than
    ``need`` runs were given to ``what`` (e.g. "the Chinchilla fit (5 parameters)").

    ``labels`` renames fields in messages, e.g. {"loss": "val/loss"}.
    """
    labels = {**FIELD_LABELS, **(labels or {})}
    bad: dict[str, list[str]] = {}  # "val/loss is nan" -> run names, in order of first appearance
    for o in obs:
        for key in ("loss", "n", "d", "c"):
            value = getattr(o, key)
            if value is None:
                continue
            value = float(value)
            if math.isnan(value):
                problem = "is nan"
            elif math.isinf(value):
                problem = "is infinite"
            elif value <= 0:
                problem = f"is {value:g} (must be > 0)"
            else:
                continue
            bad.setdefault(f"{labels[key]} {problem}", []).append(o.name)
    if bad:
        raise BadInput("; ".join(f"{runs_phrase(names)}: {problem}" for problem, names in bad.items()))
    if len(obs) < need:
        given = f" ({', '.join(o.name for o in obs)})" if obs else ""
        raise BadInput(f"{what} needs at least {need} runs but only {len(obs)} {'was' if len(obs) == 1 else 'were'} "
                       f"given{given}: a sweep needs at least {need} finished runs")


def log_key(x) -> np.ndarray:
    """Values equal to about 1e-6 relative share a key: D = C / (6N) carries float noise."""
    return np.round(np.log10(np.asarray(x, float)), 6)


def distinct_count(x) -> int:
    return int(np.unique(log_key(x)).size)


# ---------------------------------------------------------------------------------------------------------
# Kaplan et al. 2020: L(X) = (X_c / X)^alpha


@dataclass(frozen=True)
class PowerLaw:
    log_x_c: float  # the fitted parameter; X_c = exp(log X_c)
    alpha: float

    @property
    def x_c(self) -> float:
        return math.exp(self.log_x_c)

    def predict(self, x):
        """(X_c / X)^alpha, elementwise."""
        return np.exp(self.alpha * (self.log_x_c - np.log(np.asarray(x, float))))


def fit_power_law(x, loss) -> PowerLaw:
    """Least squares of log L on log X: log L = alpha log X_c - alpha log X."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    assert x.shape == loss.shape and x.ndim == 1, f"x {x.shape} and loss {loss.shape} must be equal 1-d shapes"
    if not (np.all(np.isfinite(x) & (x > 0)) and np.all(np.isfinite(loss) & (loss > 0))):
        raise BadInput("a power law needs positive finite x and loss values")
    if distinct_count(x) < 2:
        raise BadInput(f"a power law needs at least 2 distinct x values, got {distinct_count(x)}")
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
    alpha = -float(slope)
    log_x_c = float(intercept) / alpha if alpha != 0 else math.inf
    if not math.isfinite(log_x_c) or abs(log_x_c) > 700:  # exp() would overflow: the loss is flat in x
        raise BadInput(f"the loss does not change with x (fitted exponent {alpha:.2g}), so no power law fits")
    return PowerLaw(log_x_c=log_x_c, alpha=alpha)


@dataclass(frozen=True)
class KaplanFit:
    law: PowerLaw
    runs: tuple[str, ...]  # the runs the law was fitted on
    selection: str  # which runs, in words


def compute_frontier(c, loss) -> np.ndarray:
    """Mask of the runs for which no other run with C' <= C has a lower loss."""
    c, loss = np.asarray(c, float), np.asarray(loss, float)
    dominated = (c[None, :] <= c[:, None]) & (loss[None, :] < loss[:, None])  # [i, j]: run j beats run i
    return ~dominated.any(axis=1)


def kaplan_selections(obs: Sequence[Observation]) -> dict[str, tuple[list[Observation], str]]:
    """For each of "N", "D", "C": the runs that resource limits, and a line saying which they are."""
    obs = [complete(o) for o in obs]
    out = {}
    with_d = [o for o in obs if o.d is not None]
    if not with_d:
        out["N"] = (obs, f"all {len(obs)} runs (D unknown)")
    else:
        keys = log_key([o.d for o in with_d])
        at_max = [o for o, k in zip(with_d, keys) if k == keys.max()]
        d_max = max(o.d for o in at_max)
        if len(at_max) == len(obs):
            out["N"] = (at_max, f"all {len(obs)} runs (D = {d_max:.3g} tokens for every run)")
        else:
            out["N"] = (at_max, f"{len(at_max)} of {len(obs)} runs, those at the largest D = {d_max:.3g} tokens")
    keys = log_key([o.n for o in obs])
    largest_n = [o for o, k in zip(obs, keys) if k == keys.max()]
    at_max = [o for o in largest_n if o.d is not None]
    n_max = max(o.n for o in largest_n)
    out["D"] = (at_max, f"{len(at_max)} of {len(obs)} runs, those of the largest N = {n_max:.3g} with D known")
    with_c = [o for o in obs if o.c is not None]
    on = compute_frontier([o.c for o in with_c], [o.loss for o in with_c]) if with_c else np.zeros(0, bool)
    frontier = [o for o, keep in zip(with_c, on) if keep]
    out["C"] = (frontier, f"{len(frontier)} of {len(obs)} runs, the compute frontier "
                          "(no run with less or equal C has a lower loss)")
    return out


def kaplan_fits(obs: Sequence[Observation]) -> tuple[dict[str, KaplanFit], dict[str, str]]:
    """(fits, skipped): the L(N), L(D), L(C) power laws that could be fitted, and why the others could not."""
    obs = [complete(o) for o in obs]
    check_observations(obs, 2, "a Kaplan power law (2 parameters)")
    fits, skipped = {}, {}
    for key, (chosen, selection) in kaplan_selections(obs).items():
        x = [getattr(o, key.lower()) for o in chosen]
        if distinct_count(x) < 2:
            skipped[key] = (f"L({key}) not fitted: {selection}; they have {distinct_count(x)} distinct {key} "
                            f"({runs_phrase([o.name for o in chosen]) if chosen else 'no runs'}), a power law needs 2")
            continue
        try:
            law = fit_power_law(x, [o.loss for o in chosen])
        except BadInput as e:
            skipped[key] = f"L({key}) not fitted: {selection}; {e}"
            continue
        fits[key] = KaplanFit(law=law, runs=tuple(o.name for o in chosen), selection=selection)
    return fits, skipped


# ---------------------------------------------------------------------------------------------------------
# Hoffmann et al. 2022: L(N, D) = E + A / N^alpha + B / D^beta


@dataclass(frozen=True)
class ChinchillaLaw:
    """E + A / N^alpha + B / D^beta, held as log E, log A, log B: the fit works in logs, and a floor that runs
    to zero leaves log E = -800, whose E = exp(log E) is 0. Restarts and the compute-optimal split use the
    logs, never the log of an exponentiated parameter."""

    log_E: float
    log_A: float
    log_B: float
    alpha: float
    beta: float

    @classmethod
    def of(cls, E: float, A: float, B: float, alpha: float, beta: float) -> ChinchillaLaw:
        """The law with these (positive) E, A, B, e.g. a published one."""
        assert min(E, A, B) > 0, f"E={E}, A={A}, B={B} must be positive"
        return cls(math.log(E), math.log(A), math.log(B), alpha, beta)

    @property
    def E(self) -> float:
        return _exp(self.log_E)

    @property
    def A(self) -> float:
        return _exp(self.log_A)

    @property
    def B(self) -> float:
        return _exp(self.log_B)

    def predict(self, n, d):
        """E + A / N^alpha + B / D^beta, elementwise."""
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + np.exp(self.log_A - self.alpha * np.log(n)) + np.exp(self.log_B - self.beta * np.log(d))

    @property
    def has_compute_optimum(self) -> bool:
        """Whether the loss falls with both N and D, so that every budget has a best split."""
        return self.alpha > 0 and self.beta > 0

    def compute_optimal(self, c) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising the loss at budget C = 6 N D, elementwise in C."""
        if not self.has_compute_optimum:
            raise BadInput(f"the fitted law does not fall with both N and D (alpha={self.alpha:.3g}, "
                           f"beta={self.beta:.3g}), so it has no compute-optimal split; sweep wider N and D")
        s = self.alpha + self.beta
        log_g = (math.log(self.alpha) + self.log_A - math.log(self.beta) - self.log_B) / s
        log_c6 = np.log(np.asarray(c, float) / 6.0)
        return np.exp(log_g + log_c6 * self.beta / s), np.exp(log_c6 * self.alpha / s - log_g)


def _exp(x: float) -> float:
    """exp(x), 0.0 below about -745 and inf above 709 (as numpy does), not an OverflowError."""
    return math.exp(x) if x < 709 else math.inf


# The paper's grid of starting points (alpha, beta, e, a, b); 4,500 points.
PAPER_GRID = np.array(list(product(np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5), np.arange(-1, 1.01, 0.5),
                                   np.arange(0, 25.1, 5), np.arange(0, 25.1, 5))))


def one_blas_thread():
    """A context in which BLAS runs single-threaded. These problems are tiny, so extra threads only cost, and
    on a busy machine they spin: with 2 threads on a loaded 2-core machine the fits ran 4-8x slower."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def _huber_objective(theta, xn, xd, log_loss, delta):
    """Sum of Huber(delta) of predicted minus observed log-loss (divided by delta so gradients are O(1)),
    and its gradient. ``theta`` is (a', b', e, alpha, beta), shape (5,) or (5, grid), with a' = a - alpha mean(log N)
    and b' likewise: centring log N and log D keeps a and alpha from being nearly collinear for the optimiser."""
    a, b, e, alpha, beta = (t[..., None] for t in theta)
    t_n, t_d = a - alpha * xn, b - beta * xd
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    r = top + np.log(total) - log_loss
    abs_r = np.abs(r)
    value = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta)).sum(axis=-1) / delta
    slope = np.clip(r, -delta, delta) / (delta * total)  # d value / d log-loss, over the softmax's denominator
    g_n, g_d = slope * w_n, slope * w_d
    grad = np.stack([g_n.sum(-1), g_d.sum(-1), (slope * w_e).sum(-1), -(g_n * xn).sum(-1), -(g_d * xd).sum(-1)])
    return value, grad


def fit_chinchilla(n, d, loss, delta: float = 1e-3, top_k: int = 20, starts: Sequence[ChinchillaLaw] = (),
                   names: Sequence[str] | None = None) -> ChinchillaLaw:
    """Hoffmann et al.'s fit: E = exp(e), A = exp(a), B = exp(b), predicted log-loss = logsumexp(a - alpha log N,
    b - beta log D, e); minimise the summed Huber(delta) of its error on log-loss with L-BFGS-B from the
    ``top_k`` best points of the paper's grid (scored all at once) and from ``starts``; the best result wins."""
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    assert n.shape == d.shape == loss.shape and n.ndim == 1, f"shapes differ: {n.shape} {d.shape} {loss.shape}"
    names = list(names) if names is not None else [f"point {i}" for i in range(len(n))]
    check_observations([Observation(k, *v) for k, v in zip(names, zip(n, d, [None] * len(n), loss))],
                       CHINCHILLA_PARAMETERS,
                       f"the Chinchilla fit ({CHINCHILLA_PARAMETERS} parameters)")
    for label, x in (("N", n), ("D", d)):
        if distinct_count(x) < 2:
            raise BadInput(f"the Chinchilla fit needs at least 2 distinct {label} but {runs_phrase(names)} all have "
                           f"{label} = {x[0]:.3g}: vary {label} in the sweep")
    pairs = np.unique(np.stack([log_key(n), log_key(d)]), axis=1).shape[1]
    if pairs < CHINCHILLA_PARAMETERS:
        raise BadInput(f"the Chinchilla fit has {CHINCHILLA_PARAMETERS} parameters but {runs_phrase(names)} have only "
                       f"{pairs} distinct (N, D) pairs: a sweep needs at least {CHINCHILLA_PARAMETERS}")
    mean_n, mean_d = float(np.log(n).mean()), float(np.log(d).mean())
    xn, xd, log_loss = np.log(n) - mean_n, np.log(d) - mean_d, np.log(loss)

    def centred(alpha, beta, e, a, b):
        return np.array([a - alpha * mean_n, b - beta * mean_d, e, alpha, beta])

    initial = []
    if top_k > 0:
        grid = centred(*PAPER_GRID.T)
        scores, _ = _huber_objective(grid, xn, xd, log_loss, delta)
        initial = [grid[:, i] for i in np.argsort(scores)[:top_k]]
    initial += [centred(s.alpha, s.beta, s.log_E, s.log_A, s.log_B) for s in starts]
    assert initial, "top_k=0 needs at least one law in starts"
    with one_blas_thread():
        results = [minimize(_huber_objective, x0, args=(xn, xd, log_loss, delta), jac=True, method="L-BFGS-B",
                            options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9}) for x0 in initial]
    found = min(results, key=lambda r: r.fun if np.isfinite(r.fun) else math.inf)
    a, b, e, alpha, beta = (float(v) for v in found.x)
    law = ChinchillaLaw(log_E=e, log_A=a + alpha * mean_n, log_B=b + beta * mean_d, alpha=alpha, beta=beta)
    # E may underflow to 0 (the floor ran to zero; the stage says so), but no parameter may be infinite or nan.
    logs = [law.log_E, law.log_A, law.log_B]
    if not (np.all(np.isfinite(logs + [alpha, beta])) and max(logs) < 709):
        raise BadInput(f"the Chinchilla fit on {runs_phrase(names)} diverged (log E={e:.3g}, alpha={alpha:.3g}, "
                       f"beta={beta:.3g}): the losses do not follow E + A/N^alpha + B/D^beta; sweep wider N and D")
    return law


def fit_chinchilla_runs(obs: Sequence[Observation], **kwargs) -> ChinchillaLaw:
    """fit_chinchilla on runs; every run needs D or C."""
    obs = [complete(o) for o in obs]
    no_d = [o.name for o in obs if o.d is None]
    if no_d:
        raise BadInput(f"{runs_phrase(no_d)}: neither D nor C is known; the Chinchilla fit needs every run's tokens")
    return fit_chinchilla([o.n for o in obs], [o.d for o in obs], [o.loss for o in obs],
                          names=[o.name for o in obs], **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Uncertainty and extrapolation


@dataclass(frozen=True)
class BootstrapResult:
    level: float  # e.g. 0.95
    reps: int
    intervals: dict[str, tuple[float, float]]  # "kaplan/N/alpha", "chinchilla/E", "chinchilla/n_opt/1e21", ...
    failed: dict[str, int]  # per fit ("kaplan/N", "chinchilla"): resamples it could not be fitted on
    skipped: dict[str, str] = field(default_factory=dict)  # fits impossible on the full data, so not resampled


def budget_label(c: float) -> str:
    """1e21 -> '1e21', 3.2e19 -> '3.2e19': usable in metric names."""
    return f"{c:.3g}".replace("e+", "e")


def _chinchilla_numbers(law: ChinchillaLaw, budgets: Sequence[float]) -> dict[str, float]:
    """The law's parameters, and N_opt, D_opt at each budget where the law has a compute-optimal split."""
    out = {f"chinchilla/{k}": getattr(law, k) for k in ("E", "A", "B", "alpha", "beta")}
    if len(budgets) and law.has_compute_optimum:
        n_opt, d_opt = law.compute_optimal(np.asarray(budgets, float))
        for c, n_c, d_c in zip(budgets, n_opt, d_opt):
            out[f"chinchilla/n_opt/{budget_label(c)}"] = float(n_c)
            out[f"chinchilla/d_opt/{budget_label(c)}"] = float(d_c)
    return out


def bootstrap(obs: Sequence[Observation], budgets: Sequence[float] = (), reps: int = 200, level: float = 0.95,
              seed: int = 0, kaplan: bool = True, chinchilla: bool = True, start: ChinchillaLaw | None = None,
              delta: float = 1e-3, top_k: int = 2) -> BootstrapResult:
    """Percentile intervals of every fitted number (and of N_opt, D_opt at each budget) over ``reps`` resamples
    of the runs drawn with replacement. A resample a fit fails on is counted in ``failed`` and left out.

    Each resample's Chinchilla fit starts from the full-data fit (``start``, fitted here when not given) and
    from the ``top_k`` best grid points, so it is cheap.
    """
    assert 0 < level < 1 and reps > 0, f"level {level} must be in (0, 1) and reps {reps} positive"
    obs = [complete(o) for o in obs]
    check_observations(obs, 2, "the bootstrap")
    skipped: dict[str, str] = {}
    fit_keys: list[str] = []
    if kaplan:
        fits, why = kaplan_fits(obs)
        skipped.update({f"kaplan/{k}": v for k, v in why.items()})
        fit_keys = list(fits)
    if not chinchilla:
        start = None
    else:
        try:
            start = start if start is not None else fit_chinchilla_runs(obs, delta=delta)
        except BadInput as e:
            skipped["chinchilla"], start = str(e), None
        if start is not None and len(budgets) and not start.has_compute_optimum:  # said once, here
            skipped["chinchilla/compute_optimal"] = (f"the Chinchilla law does not fall with both N and D "
                                                     f"(beta={start.beta:.3g}): no compute-optimal split")
    samples: dict[str, list[float]] = {}
    failed = {**{f"kaplan/{k}": 0 for k in fit_keys}, **({"chinchilla": 0} if start is not None else {})}
    rng = np.random.default_rng(seed)
    with one_blas_thread():
        for _ in range(reps):
            _resample_fits(obs, rng, budgets, fit_keys, start, samples, failed, delta, top_k)
    tails = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    intervals = {k: (float(np.percentile(v, tails[0])), float(np.percentile(v, tails[1]))) for k, v in samples.items()}
    return BootstrapResult(level=level, reps=reps, intervals=intervals, failed=failed, skipped=skipped)


def _resample_fits(obs, rng, budgets, fit_keys, start, samples, failed, delta, top_k) -> None:
    """One bootstrap resample: its fitted numbers go to ``samples``, its failures to ``failed``."""
    resample = [obs[i] for i in rng.integers(len(obs), size=len(obs))]
    if fit_keys:
        fits, _ = kaplan_fits(resample)
        for k in fit_keys:
            if k not in fits:
                failed[f"kaplan/{k}"] += 1
                continue
            samples.setdefault(f"kaplan/{k}/alpha", []).append(fits[k].law.alpha)
            samples.setdefault(f"kaplan/{k}/x_c", []).append(fits[k].law.x_c)
    if start is None:
        return
    try:
        law = fit_chinchilla_runs(resample, delta=delta, top_k=top_k, starts=[start])
    except BadInput:
        failed["chinchilla"] += 1
        return
    if len(budgets) and start.has_compute_optimum and not law.has_compute_optimum:
        failed["chinchilla/compute_optimal"] = failed.get("chinchilla/compute_optimal", 0) + 1
    for k, v in _chinchilla_numbers(law, budgets).items():
        samples.setdefault(k, []).append(v)


@dataclass(frozen=True)
class Prediction:
    predicted: float
    observed: float
    relative_error: float  # |predicted - observed| / observed


@dataclass(frozen=True)
class HeldOut:
    name: str  # the held-out run
    chinchilla: Prediction | None
    kaplan_n: Prediction | None  # Kaplan L(N) fitted on the other runs
    skipped: dict[str, str]  # why a prediction is None


def heldout_check(obs: Sequence[Observation], delta: float = 1e-3, top_k: int = 20) -> HeldOut:
    """Fit on every run but the largest (largest N, ties broken by largest C) and predict that run's loss."""
    obs = [complete(o) for o in obs]
    check_observations(obs, 3, "the held-out check (2 runs to fit on, 1 to predict)")
    largest = max(range(len(obs)), key=lambda i: (obs[i].n, obs[i].c if obs[i].c is not None else -math.inf))
    held, rest = obs[largest], obs[:largest] + obs[largest + 1:]

    def scored(predicted: float) -> Prediction:
        observed = float(held.loss)
        return Prediction(float(predicted), observed, abs(float(predicted) - observed) / observed)

    skipped, chin, kap = {}, None, None
    if held.d is None:
        skipped["chinchilla"] = f"run {held.name} has neither D nor C"
    else:
        try:
            chin = scored(fit_chinchilla_runs(rest, delta=delta, top_k=top_k).predict(held.n, held.d))
        except BadInput as e:
            skipped["chinchilla"] = str(e)
    fits, why = kaplan_fits(rest)
    if "N" in fits:
        kap = scored(fits["N"].law.predict(held.n))
    else:
        skipped["kaplan_n"] = why["N"]
    return HeldOut(name=held.name, chinchilla=chin, kaplan_n=kap, skipped=skipped)


# ---------------------------------------------------------------------------------------------------------
# Published or own measurements from a table


def read_csv(path: str | Path) -> list[Observation]:
    """Observations from a CSV with a header naming (any case) N, loss, D and/or C, and optionally name.

    Other columns are ignored; an empty D or C cell is computed from the other (C = 6 N D).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist: give a CSV with columns N, D and/or C, loss")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets may start with a byte-order mark
        rows = [(line, row) for line, row in _numbered(csv.reader(f)) if any(cell.strip() for cell in row)]
    if not rows:
        raise BadInput(f"{path} is empty: expected a header line with columns N, D and/or C, loss (optionally name)")
    header_line, header = rows[0]
    columns = {cell.strip().lower(): i for i, cell in enumerate(header)}
    need = [k for k in ("n", "loss") if k not in columns]
    if "d" not in columns and "c" not in columns:
        need.append("D or C")
    if need:
        raise BadInput(f"{path} line {header_line}: the header has no column {', '.join(need)} "
                       f"(it has {', '.join(cell.strip() for cell in header)})")
    if len(rows) == 1:
        raise BadInput(f"{path} has a header but no data rows")
    out = []
    for row_number, (line, row) in enumerate(rows[1:], start=1):
        where = f"{path} row {row_number} (line {line})"
        if len(row) != len(header):
            raise BadInput(f"{where} has {len(row)} fields but the header has {len(header)}")

        def number(key: str, optional: bool = False) -> float | None:
            if key not in columns:
                return None
            text = row[columns[key]].strip()
            if not text:
                if optional:
                    return None
                raise BadInput(f"{where}, column {header[columns[key]].strip()}: the cell is empty")
            try:
                return float(text)
            except ValueError:
                raise BadInput(f"{where}, column {header[columns[key]].strip()}: {text!r} is not a number") from None

        n, loss, d, c = number("n"), number("loss"), number("d", optional=True), number("c", optional=True)
        if d is None and c is None:
            raise BadInput(f"{where}: D and C are both empty, give at least one")
        name = row[columns["name"]].strip() if "name" in columns else ""
        out.append(Observation(name=name or f"row {row_number}", n=n, d=d, c=c, loss=loss))
    try:
        check_observations(out, 1, str(path))
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None
    return [complete(o) for o in out]


def write_csv(obs: Sequence[Observation], path: str | Path) -> Path:
    """The observations as a CSV that ``read_csv`` reads back (to refit, or to fit elsewhere)."""
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["name", "N", "D", "C", "loss"])
        out.writerows([o.name, o.n, o.d, o.c, o.loss] for o in obs)
    return Path(path)


def _numbered(reader):
    """(line number where the row starts, row) for each row of a csv reader."""
    line = 1
    for row in reader:
        yield line, row
        line = reader.line_num + 1
