"""Pictures of a tokenized corpus, written as PNG for MLflow."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_corpus(bins: list[int], counts: list[list[int]], sources: list[str], bytes_per_token: list[float],
                path: Path) -> Path:
    """Left: documents per length bucket (tokens) per source. Right: bytes per token per source."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    counts_arr = np.asarray(counts)
    used = np.flatnonzero(counts_arr.sum(axis=0))
    lo, hi = (used.min(), used.max() + 1) if len(used) else (0, 1)
    edges = np.asarray(bins[lo:hi + 1], dtype=float)
    width = 0.8 / max(len(sources), 1)
    for i, name in enumerate(sources):
        left.bar(np.arange(lo, hi) + i * width, counts_arr[i, lo:hi], width=width, label=name)
    left.set_xticks(np.arange(lo, hi) + 0.4 - width / 2)
    left.set_xticklabels([f"<{int(e)}" for e in edges[1:]], rotation=45, fontsize=8)
    left.set_yscale("log")
    left.set_xlabel("document length (tokens, EOS included)")
    left.set_ylabel("documents")
    left.legend()
    left.set_title("Document lengths")
    right.bar(sources, bytes_per_token, color=[f"C{i}" for i in range(len(sources))])
    right.set_ylabel("UTF-8 bytes per token")
    right.set_title("Compression by source")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
