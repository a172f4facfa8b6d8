"""Dedup plots: cluster sizes and removals per level; detection rate against true Jaccard similarity."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.dedup.minhash import detection_probability  # noqa: E402


def plot_clusters(cluster_sizes: dict[int, int], removed: dict[str, int], path: Path) -> Path:
    """Left: how many kept documents stand for clusters of each size. Right: documents removed per level."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.4, 1]})
    sizes = sorted(cluster_sizes)
    left.bar(range(len(sizes)), [cluster_sizes[s] for s in sizes], color="tab:blue")
    left.set_xticks(range(len(sizes)))
    left.set_xticklabels([str(s) for s in sizes])
    left.set_yscale("log")
    left.set_xlabel("cluster size (documents, the kept one included)")
    left.set_ylabel("clusters (log scale)")
    left.set_title(f"Cluster sizes: {sum(c for s, c in cluster_sizes.items() if s > 1):,} clusters of 2 or more")
    bars = right.bar(list(removed), list(removed.values()), color="tab:red")
    for bar, n in zip(bars, removed.values()):
        right.annotate(f"{n:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                       fontsize=8)
    right.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.set_ylabel("documents removed")
    right.set_title("Removed per level")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_detection(report: dict, path: Path, bins: int = 14) -> Path:
    """Share of pairs detected per true-Jaccard bin, beside LSH's candidate probability 1-(1-s^r)^b."""
    jac = np.asarray(report["curve"]["jaccard"])
    hit = np.asarray(report["curve"]["detected"], bool)
    lo = min(float(jac.min()) if len(jac) else 0.3, 0.3)
    edges = np.linspace(lo, 1.0, bins + 1)
    which = np.clip(np.digitize(jac, edges) - 1, 0, bins - 1)
    centres, rates, counts = [], [], []
    for b in range(bins):
        mask = which == b
        if mask.any():
            centres.append((edges[b] + edges[b + 1]) / 2)
            rates.append(hit[mask].mean())
            counts.append(int(mask.sum()))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    s = np.linspace(lo, 1, 200)
    ax.plot(s, detection_probability(s, report["bands"], report["rows"]), color="gray", lw=1,
            label=f"LSH candidate probability (b={report['bands']}, r={report['rows']})")
    ax.plot(centres, rates, "o-", color="tab:blue", label=f"detected (verify={report['verify']})")
    for x, y, c in zip(centres, rates, counts):
        ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.axvline(report["threshold"], color="tab:red", ls="--", lw=1, label=f"threshold {report['threshold']}")
    o = report["overall"]
    ax.set_title(f"Near-duplicate detection: precision {o['precision']:.3f}, recall {o['recall']:.3f} "
                 f"({o['true_pairs']} true pairs)", fontsize=10)
    ax.set_xlabel("true Jaccard similarity of the pair's shingle sets (numbers: pairs per bin)")
    ax.set_ylabel("share of pairs detected")
    ax.set_ylim(-0.03, 1.1)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
