"""What dedup publishes beside its shards: metrics and counts from the levels' statistics, the boilerplate
report and plot, and the near-duplicate evaluation's report, plot, metrics and summary."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline.dedup.evaluate import EvalSpec, evaluate_near
from pipeline.dedup.minhash import NearSpec
from pipeline.dedup.plots import plot_clusters, plot_detection
from pipeline.dedup.run import LEVELS

# statistics of deduplicate() logged as they are, as dedup/<level>/<name> (near_pairs -> dedup/near/pairs)
LOGGED_STATS = ("near_pairs", "near_too_short", "near_indexed", "near_signature_docs_per_s", "near_index_seconds",
                "url_missing", "lines_frequent", "lines_removed", "lines_headings_kept")
SUMMARY_KEYS = ("threshold", "bands", "rows", "verify", "documents", "planted", "sampled_documents", "overall",
                "real", "planted_pairs", "by_edit_rate")


def dedup_metrics(stats: dict) -> dict[str, float]:
    """The dedup/... metrics of ``deduplicate(...).stats``."""
    n, removed = stats["input"], stats["removed"]
    metrics = {"dedup/input_documents": n, "dedup/kept_documents": stats["kept"],
               "dedup/removed_documents": sum(removed.values()), "dedup/kept_fraction": stats["kept"] / max(n, 1),
               "dedup/clusters": sum(c for size, c in stats["cluster_sizes"].items() if size > 1),
               "dedup/largest_cluster": max(stats["cluster_sizes"], default=0),
               **{f"dedup/removed/{lv}": c for lv, c in removed.items()},
               **{f"dedup/removed_fraction/{lv}": c / max(n, 1) for lv, c in removed.items()}}
    metrics.update({f"dedup/{key.replace('_', '/', 1)}": stats[key] for key in LOGGED_STATS if key in stats})
    return metrics


def dedup_warnings(stats: dict) -> list[str]:
    """A line when no document was kept, with the levels that removed the most (or saying the input was
    empty): the stages downstream refuse an empty corpus, and this stage can say why it is empty."""
    if stats["kept"]:
        return []
    if not stats["input"]:
        return ["kept 0 of 0 documents: its input is empty (see the upstream stage's manifest); "
                "downstream stages will refuse it"]
    top = ", ".join(f"{lv} {n}" for lv, n in sorted(stats["removed"].items(), key=lambda ln: -ln[1])[:3] if n)
    return [f"kept 0 of {stats['input']} documents ({top}): the corpus is empty; "
            f"downstream stages will refuse it"]


def dedup_counts(stats: dict) -> dict:
    """The manifest's counts: input = kept + removed, removals per level, cluster sizes, index figures."""
    counts = {"input": stats["input"], "kept": stats["kept"], "removed": sum(stats["removed"].values()),
              "removed_by_level": stats["removed"],
              "cluster_sizes": {str(k): v for k, v in stats["cluster_sizes"].items()},
              "near": {k: stats[k] for k in ("near_bands", "near_rows", "near_pairs", "near_indexed", "near_too_short")
                       if k in stats},
              "lines": {k: stats[k] for k in ("lines_frequent", "lines_removed", "lines_headings_kept") if k in stats}}
    assert counts["kept"] + counts["removed"] == counts["input"] and set(stats["removed"]) == set(LEVELS), counts
    return counts


def write_dedup_reports(stats: dict, out_dir: Path) -> list[Path]:
    """boilerplate_lines.json (the most frequent lines removed, and those kept as section headings) and
    clusters.png, in ``out_dir``."""
    lines = Path(out_dir) / "boilerplate_lines.json"
    listed = {part: [{"line": line, "documents": n} for line, n in stats.get(key, [])]
              for part, key in (("removed", "lines_top"), ("kept_headings", "lines_headings_top"))}
    lines.write_text(json.dumps(listed, indent=1, ensure_ascii=False) + "\n")
    return [lines, plot_clusters(stats["cluster_sizes"], stats["removed"], Path(out_dir) / "clusters.png")]


def near_eval_metrics(report: dict) -> dict[str, float]:
    """The dedup_eval/... metrics of an ``evaluate_near`` report; a NaN (nothing to divide by) is left out."""
    metrics = {"dedup_eval/documents": report["documents"], "dedup_eval/planted": report["planted"]}
    for part in ("overall", "real", "planted_pairs"):
        prefix = "dedup_eval" if part == "overall" else f"dedup_eval/{part.split('_')[0]}"
        for key in ("precision", "recall", "true_pairs", "detected_pairs"):
            value = report[part][key]
            if value == value:
                metrics[f"{prefix}/{key}"] = value
    for rate, row in report["by_edit_rate"].items():
        metrics[f"dedup_eval/detected_at_edit_rate/{rate}"] = row["detected"]
    return metrics


def near_eval_lines(summary: dict) -> list[str]:
    """The evaluation in a few lines of text: precision and recall, then detection per edit rate."""
    o = summary["overall"]
    lines = [f"near-duplicates at threshold {summary['threshold']} (b={summary['bands']}, r={summary['rows']}, "
             f"verify={summary['verify']}): precision {o['precision']:.3f}, recall {o['recall']:.3f} over "
             f"{o['true_pairs']} true pairs ({summary['documents']} documents + {summary['planted']} planted copies)"]
    for rate, row in summary["by_edit_rate"].items():
        lines.append(f"  copies with {float(rate):6.1%} of words edited: mean Jaccard {row['mean_jaccard']:.3f}, "
                     f"detected {row['detected']:.0%}")
    return lines


@dataclass
class NearEval:
    summary: dict  # the report without its curve, for the manifest's counts
    metrics: dict[str, float]
    files: list[Path] = field(default_factory=list)  # near_eval.json, near_detection.png


def near_eval(texts: Sequence[str], near: NearSpec, spec: EvalSpec, out_dir: Path, progress: bool = True) -> NearEval:
    """Precision and recall of near-duplicate detection on ``texts`` (planted copies added); writes
    near_eval.json and near_detection.png in ``out_dir``."""
    report = evaluate_near(texts, near, spec, progress=progress)
    path = Path(out_dir) / "near_eval.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return NearEval(summary={k: report[k] for k in SUMMARY_KEYS}, metrics=near_eval_metrics(report),
                    files=[path, plot_detection(report, Path(out_dir) / "near_detection.png")])
