"""What the filter stage reports: its metrics, its manifest counts, and the rejected samples and funnel plot."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.filter.plots import plot_funnel

OUTPUTS = {"kept": "kept/*.parquet", "rejected": "rejected/*.parquet", "scores": "scores/*.parquet",
           "plot": "funnel.png", "rejected_samples": "rejected_samples.json"}


def filter_metrics(stats: dict) -> dict[str, float]:
    """The funnel as MLflow metrics: documents in, kept and rejected, per rule, per step, PII redactions."""
    n_in = sum(s["input"] for s in stats["per_source"].values())
    n_kept = sum(s["kept"] for s in stats["per_source"].values())
    return {"filter/input_documents": n_in, "filter/kept_documents": n_kept,
            "filter/rejected_documents": n_in - n_kept, "filter/kept_fraction": n_kept / max(n_in, 1),
            "filter/input_mb": stats["bytes_in"] / 1e6, "filter/kept_chars": stats["chars_kept"],
            **{f"filter/pii_{kind}": n for kind, n in stats["pii"].items()},
            **{f"filter/removed/{rule}": n for rule, n in stats["rules"].items()},
            **{f"filter/removed_fraction/{rule}": n / max(n_in, 1) for rule, n in stats["rules"].items()},
            **{f"filter/left_after/{step}": n for step, n in stats["funnel"][1:]},
            **{f"filter/c4_lines_removed/{rule}": n for rule, n in stats["c4_lines_removed"].items()}}


def filter_warnings(stats: dict) -> list[str]:
    """A line when no document was kept, with the rules that rejected the most: the stages downstream refuse
    an empty corpus, and this is the stage that can say why it is empty."""
    n_in = sum(s["input"] for s in stats["per_source"].values())
    if sum(s["kept"] for s in stats["per_source"].values()):
        return []
    top = ", ".join(f"{rule} {n}" for rule, n in sorted(stats["rules"].items(), key=lambda rn: -rn[1])[:3])
    return [f"kept 0 of {n_in} documents{f' ({top})' if top else ''}: the corpus is empty and "
            f"downstream stages will refuse it; {OUTPUTS['rejected_samples']} shows why"]


def filter_counts(stats: dict) -> dict:
    """The manifest's counts: kept + rejected = input, overall and per source."""
    n_in = sum(s["input"] for s in stats["per_source"].values())
    n_kept = sum(s["kept"] for s in stats["per_source"].values())
    return {"input": n_in, "kept": n_kept, "rejected": n_in - n_kept, "per_source": stats["per_source"],
            "rejected_by_rule": stats["rules"], "pii_redacted": stats["pii"], "funnel": dict(stats["funnel"]),
            "c4_lines_removed": stats["c4_lines_removed"], "scores": stats["scores"]}


def write_filter_reports(stats: dict, out_dir: Path) -> list[Path]:
    """rejected_samples.json (a few rejected documents per rule) and funnel.png, in ``out_dir``."""
    samples = Path(out_dir) / OUTPUTS["rejected_samples"]
    samples.write_text(json.dumps(stats["samples"], indent=1, ensure_ascii=False))
    return [samples, plot_funnel(stats["funnel"], stats["rules"], Path(out_dir) / OUTPUTS["plot"])]
