"""The filter's funnel: documents left after each step, and what each rule removed."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_funnel(funnel: list[tuple[str, int]], rules: dict[str, int], path: Path, top_rules: int = 15) -> Path:
    """Left: documents left after each step. Right: the rules that removed the most documents."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    names = [name for name, _ in funnel]
    left_counts = [n for _, n in funnel]
    bars = left.bar(range(len(names)), left_counts, color="tab:blue")
    for bar, n in zip(bars, left_counts):
        left.annotate(f"{n:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=8)
    left.set_xticks(range(len(names)))
    left.set_xticklabels([n if i == 0 else f"after\n{n}" for i, n in enumerate(names)], fontsize=8)
    left.set_ylabel("documents")
    left.set_title("Documents left after each step")
    top = sorted(rules.items(), key=lambda kv: -kv[1])[:top_rules][::-1]
    bars = right.barh([r for r, _ in top], [c for _, c in top], color="tab:red")
    for bar, (_, c) in zip(bars, top):
        right.annotate(f" {c:,}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=7)
    right.set_xscale("log")  # one rule (often language) dwarfs the rest
    right.tick_params(axis="y", labelsize=7)
    right.set_xlabel("documents removed (log scale)")
    right.set_title("Removed by rule (first failing rule)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
