"""Scaling-law pictures, written as PNG: loss against N, D and C with the fitted laws, and a parity plot."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.scaling.laws import (  # noqa: E402
    KAPLAN_PUBLISHED, ChinchillaLaw, KaplanFit, Observation, complete, compute_frontier, log_key)

AXIS = {"N": "non-embedding parameters N", "D": "tokens D", "C": "FLOPs C = 6ND"}
LOSS = "validation loss (nats/token)"
MAX_CURVES = 8  # Chinchilla curves per panel; more distinct D (or N) than this are thinned evenly


def _spread(values: Sequence[float]) -> np.ndarray:
    """The distinct values, thinned to at most MAX_CURVES spread evenly over their sorted order."""
    values = np.asarray(values, float)
    _, first = np.unique(log_key(values), return_index=True)
    distinct = np.sort(values[first])
    if len(distinct) > MAX_CURVES:
        distinct = distinct[np.unique(np.linspace(0, len(distinct) - 1, MAX_CURVES).round().astype(int))]
    return distinct


def _span(values: Sequence[float]) -> np.ndarray:
    lo, hi = min(values), max(values)
    return np.geomspace(lo / 1.5, hi * 1.5, 100)


def _log_axes(ax, key: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Losses span about a decade: label minor ticks with plain numbers (3, 4, 6), not 4 x 10^0.
    ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1)))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1)))
    ax.set_xlabel(AXIS[key])
    ax.set_ylabel(LOSS)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")


def _kaplan_label(key: str, fit: KaplanFit) -> str:
    return (f"Kaplan L({key}): α_{key} = {fit.law.alpha:.3f} (published {KAPLAN_PUBLISHED[key]}), "
            f"{len(fit.runs)} runs")


def _loss_panel(ax, obs: list[Observation], key: str, by: str, fit: KaplanFit | None,
                chinchilla: ChinchillaLaw | None) -> None:
    """Loss against ``key`` ("N" or "D"), points coloured by ``by``, with Chinchilla at each distinct ``by``."""
    x = np.array([getattr(o, key.lower()) for o in obs], float)
    colour_of = np.array([np.nan if getattr(o, by.lower()) is None else getattr(o, by.lower()) for o in obs], float)
    known = np.isfinite(colour_of)
    loss = np.array([o.loss for o in obs])
    cmap = plt.get_cmap("viridis")
    norm = None
    if known.any():
        lo, hi = colour_of[known].min(), colour_of[known].max()
        norm = matplotlib.colors.LogNorm(lo, hi if hi > lo else lo * 10)
        points = ax.scatter(x[known], loss[known], c=colour_of[known], cmap=cmap, norm=norm, s=28, zorder=3,
                            edgecolors="black", linewidths=0.4)
        ax.figure.colorbar(points, ax=ax, label=AXIS[by])
    if (~known).any():
        ax.scatter(x[~known], loss[~known], color="gray", s=28, zorder=3, label=f"runs with {by} unknown")
    grid = _span(x)
    if chinchilla is not None and known.any():
        for value in _spread(colour_of[known]):
            n, d = (grid, value) if key == "N" else (value, grid)
            ax.plot(grid, chinchilla.predict(n, d), color=cmap(norm(value)), lw=1, alpha=0.8)
        ax.plot([], [], color="gray", lw=1, label=f"Chinchilla L(N, D) at each {by}")
    if fit is not None:
        ax.plot(grid, fit.law.predict(grid), "k--", lw=1.5, label=_kaplan_label(key, fit))
    _log_axes(ax, key, f"Loss vs {key}")


def _compute_panel(ax, obs: list[Observation], fit: KaplanFit | None, chinchilla: ChinchillaLaw | None) -> None:
    """Loss against C; the compute frontier highlighted, with L(C) and Chinchilla's compute-optimal loss."""
    with_c = [o for o in obs if o.c is not None]
    if not with_c:
        ax.text(0.5, 0.5, "no run has C (or D) known", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("Loss vs C")
        return
    c = np.array([o.c for o in with_c])
    loss = np.array([o.loss for o in with_c])
    on = compute_frontier(c, loss)
    ax.scatter(c[~on], loss[~on], color="lightgray", edgecolors="gray", s=24, zorder=2, label="runs")
    order = np.argsort(c[on])
    ax.plot(c[on][order], loss[on][order], "o-", color="tab:red", ms=6, lw=0.8, zorder=3,
            label=f"compute frontier ({int(on.sum())} runs)")
    grid = _span(c)
    if fit is not None:
        ax.plot(grid, fit.law.predict(grid), "k--", lw=1.5, label=_kaplan_label("C", fit))
    if chinchilla is not None and chinchilla.has_compute_optimum:
        n_opt, d_opt = chinchilla.compute_optimal(grid)
        ax.plot(grid, chinchilla.predict(n_opt, d_opt), color="tab:blue", lw=1.2,
                label="Chinchilla at the compute-optimal N, D")
    _log_axes(ax, "C", "Loss vs C")


def plot_scaling(obs: Sequence[Observation], kaplan: Mapping[str, KaplanFit] | None,
                 chinchilla: ChinchillaLaw | None, path: str | Path) -> Path:
    """Loss against N (coloured by D), against D (coloured by N) and against C, with whichever fits exist."""
    obs = [complete(o) for o in obs]
    kaplan = kaplan or {}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    _loss_panel(axes[0], obs, "N", "D", kaplan.get("N"), chinchilla)
    with_d = [o for o in obs if o.d is not None]
    if with_d:
        _loss_panel(axes[1], with_d, "D", "N", kaplan.get("D"), chinchilla)
    else:
        axes[1].text(0.5, 0.5, "no run has D (or C) known", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_title("Loss vs D")
    _compute_panel(axes[2], obs, kaplan.get("C"), chinchilla)
    if chinchilla is None:
        title = "Chinchilla L(N, D) not fitted"
    else:
        title = (f"Chinchilla: L = {chinchilla.E:.3g} + {chinchilla.A:.3g}/N^{chinchilla.alpha:.3f} + "
                 f"{chinchilla.B:.3g}/D^{chinchilla.beta:.3f}")
    fig.suptitle(f"Scaling laws over {len(obs)} runs. {title}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_parity(obs: Sequence[Observation], chinchilla: ChinchillaLaw | None, path: str | Path) -> Path:
    """Chinchilla's fitted loss against the observed loss of each run with D known, with the line y = x."""
    obs = [o for o in (complete(o) for o in obs) if o.d is not None]
    fig, ax = plt.subplots(figsize=(6, 5.5))
    observed = np.array([o.loss for o in obs], float)
    if chinchilla is None or not obs:
        ax.text(0.5, 0.5, "no Chinchilla fit" if obs else "no run has D (or C) known", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_title("Chinchilla fit against observed loss")
    else:
        fitted = chinchilla.predict([o.n for o in obs], [o.d for o in obs])
        lo, hi = min(observed.min(), fitted.min()) / 1.02, max(observed.max(), fitted.max()) * 1.02
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1, label="y = x")
        ax.scatter(observed, fitted, color="tab:blue", s=24, zorder=3, label="runs")
        if len(obs) <= 20:
            for o, y in zip(obs, fitted):
                ax.annotate(o.name, (o.loss, y), textcoords="offset points", xytext=(4, -8), fontsize=6)
        rel = np.abs(fitted - observed) / observed
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"Chinchilla fit against observed loss\nmean |error| {100 * rel.mean():.2f}%, "
                     f"max {100 * rel.max():.2f}% over {len(obs)} runs", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel(f"observed {LOSS}")
    ax.set_ylabel(f"fitted {LOSS}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
