"""Score every model on every held-out set; one row per (model, set, source) for the table and MLflow."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import BadInput
from pipeline.evaluate.models import ScoredModel
from pipeline.evaluate.perplexity import Totals, score_documents

ALL = "all"  # the source column's value for a set's total


@dataclass
class HeldOut:
    """Documents to score, with the source each came from (for the per-source breakdown)."""

    texts: list[str]
    sources: list[str]

    @property
    def n_bytes(self) -> np.ndarray:
        return np.array([len(t.encode("utf-8")) for t in self.texts], dtype=np.int64)


def read_held_out(path: Path, max_documents: Optional[int] = None) -> HeldOut:
    """A stage's held-out documents: Parquet with columns text and source."""
    table = pq.read_table(path, columns=["text", "source"])
    if max_documents is not None:
        table = table.slice(0, max_documents)
    texts = [t or "" for t in table.column("text").to_pylist()]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    return HeldOut([texts[i] for i in keep], [table.column("source")[i].as_py() for i in keep])


@dataclass
class Row:
    model: str
    set: str
    source: str
    totals: Totals

    def as_dict(self) -> dict:
        return {"model": self.model, "set": self.set, "source": self.source, **self.totals.metrics()}


def evaluate_model(model: ScoredModel, sets: dict[str, HeldOut], stride: Optional[int], batch_size: int,
                   device: str) -> list[Row]:
    """Rows for one model: each set's total, then one row per source when the set has several."""
    stride = stride or max(model.context // 2, 1)
    if stride > model.context:
        raise BadInput(f"evaluate.stride={stride} is longer than model {model.name}'s context ({model.context})")
    rows = []
    for name, held in sets.items():
        scores = score_documents(model.logits_fn, model.encode(held.texts), held.n_bytes, model.prefix_id,
                                 model.context, stride, batch_size, device, progress=f"{model.name} on {name}")
        rows.append(Row(model.name, name, ALL, scores.total()))
        sources = np.asarray(held.sources, dtype=object)
        distinct = sorted(set(held.sources))
        if len(distinct) > 1:
            rows += [Row(model.name, name, s, scores.total(sources == s)) for s in distinct]
    return rows


def metrics_of(rows: list[Row]) -> dict[str, float]:
    """eval/<model>/<set>/{loss,ppl,bpb}, and eval/<model>/<set>/<source>/... per source."""
    out = {}
    for r in rows:
        prefix = f"eval/{r.model}/{r.set}" + ("" if r.source == ALL else f"/{r.source}")
        for key in ("loss", "ppl", "bpb"):
            value = getattr(r.totals, key)
            if math.isfinite(value):
                out[f"{prefix}/{key}"] = value
    return out


def table(rows: list[Row]) -> str:
    """A Markdown table: models down, set (and source) across would be wide; one line per row instead."""
    header = "| model | set | source | documents | tokens | bytes | loss (nats/token) | perplexity | bits/byte |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        t = r.totals
        lines.append(f"| {r.model} | {r.set} | {r.source} | {t.documents:,} | {t.tokens:,} | {t.bytes:,} | "
                     f"{t.loss:.4f} | {t.ppl:.2f} | {t.bpb:.4f} |")
    return "\n".join(lines)


def matrix(rows: list[Row]) -> str:
    """Bits per byte and perplexity per (set, source) and model: the table to compare models at a glance."""
    models = list(dict.fromkeys(r.model for r in rows))
    places = list(dict.fromkeys((r.set, r.source) for r in rows))
    value = {(r.model, r.set, r.source): r.totals for r in rows}
    lines = ["| bits/byte (perplexity) | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for s, src in places:
        label = s if src == ALL else f"{s} / {src}"
        cells = [f"{value[(m, s, src)].bpb:.4f} ({value[(m, s, src)].ppl:.1f})" if (m, s, src) in value else ""
                 for m in models]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prompting_report(results: list) -> tuple[str, str, dict[str, float]]:
    """(accuracy table: task and shots down, models across, baselines beside; confusion matrices; metrics)
    from (model name, TaskResult) pairs."""
    models = list(dict.fromkeys(m for m, _ in results))
    places = list(dict.fromkeys((r.name, r.shots) for _, r in results))
    by = {(m, r.name, r.shots): r for m, r in results}
    lines = ["| task | shots | examples | " + " | ".join(models) + " | random | majority |",
             "|---|---|---|" + "---|" * (len(models) + 2)]
    metrics = {}
    for task, shots in places:
        first = next(r for (m, t, k), r in by.items() if (t, k) == (task, shots))
        cells = [f"{by[(m, task, shots)].accuracy:.3f}" if (m, task, shots) in by else "" for m in models]
        examples = f"{first.n}" + (f" ({first.skipped} too long, left out)" if first.skipped else "")
        lines.append(f"| {task} | {shots} | {examples} | " + " | ".join(cells)
                     + f" | {first.random_baseline:.3f} | {first.majority_baseline:.3f} |")
        metrics[f"prompt/{task}/random_baseline"] = first.random_baseline
        metrics[f"prompt/{task}/majority_baseline"] = first.majority_baseline
    details = []
    for m, r in results:
        metrics[f"prompt/{m}/{r.name}/{r.shots}shot/accuracy"] = r.accuracy
        details.append(f"### {m}, {r.name}, {r.shots}-shot: accuracy {r.accuracy:.3f}\n\n{r.confusion_table()}\n")
    return "\n".join(lines), "\n".join(details), metrics

