"""Score every model on every held-out set and prompting task: one row per (model, set, source), and the
metrics, tables and Markdown report the evaluate stage publishes."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq

from pipeline.data.sources import SourceSpec, load_source
from pipeline.errors import BadInput
from pipeline.evaluate.models import ScoredModel
from pipeline.evaluate.perplexity import Totals, score_documents
from pipeline.evaluate.prompting import PromptSuite, TaskResult

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


def held_out_set(name: str, spec: SourceSpec, val_documents: Optional[Path], cache_dir: str) -> HeldOut:
    """Set ``name``'s documents: a stage's held-out documents (``val_documents``, with their sources), or
    else the files ``spec`` names, read like tokenize.sources."""
    if val_documents is not None:
        held = read_held_out(val_documents, spec.max_documents)
    else:
        texts = [t for t in load_source(name, spec, cache_dir=cache_dir)["text"] if t and t.strip()]
        held = HeldOut(texts, [name] * len(texts))
    if not held.texts:
        raise BadInput(f"evaluate.sets.{name} holds no non-empty documents")
    return held


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



@dataclass
class Check:
    """One more evaluation every model goes through (bias, summarization, a task head, the harness agreement):
    ``run(name, model)`` gives a model's result; ``report(results, evaluation)`` turns the (model, result)
    pairs into a Markdown section and metrics, seeing the rest of the evaluation (e.g. prompting accuracy)."""

    key: str  # its name in metrics and timings: harness, summarize, bias, head
    title: str
    run: Callable[[str, ScoredModel], Any]
    report: Callable[[list[tuple[str, Any]], "Evaluation"], tuple[str, dict[str, float]]]
    results: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class Evaluation:
    """Everything the models scored, and what the evaluate stage publishes from it."""

    documents: dict[str, int]  # set -> documents scored
    rows: list[Row] = field(default_factory=list)
    prompting: list[tuple[str, TaskResult]] = field(default_factory=list)  # (model, result) pairs
    parameters: dict[str, int] = field(default_factory=dict)  # model -> parameter count
    checks: list[Check] = field(default_factory=list)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, part) -> wall time

    def _sections(self) -> list[tuple[str, str, dict[str, float]]]:
        return [(c.title, *c.report(c.results, self)) for c in self.checks if c.results]

    def metrics(self) -> dict[str, float]:
        metrics = metrics_of(self.rows)
        if self.prompting:
            metrics.update(prompting_report(self.prompting)[2])
        for _, _, m in self._sections():
            metrics.update(m)
        metrics.update({f"seconds/{model}/{part}": t for (model, part), t in self.seconds.items()})
        return metrics

    def prompt_accuracy(self, task: str, shots: int = 0) -> dict[str, float]:
        """model -> accuracy on prompting task ``task`` with ``shots`` demonstrations."""
        return {m: r.accuracy for m, r in self.prompting if r.name == task and r.shots == shots}

    def counts(self) -> dict:
        return {"documents": self.documents, "parameters": self.parameters,
                "prompting": {f"{m}/{r.name}/{r.shots}shot": r.n for m, r in self.prompting}}

    def report(self) -> str:
        """results.md: the bits-per-byte matrix, every measure, the prompting accuracies, then each check."""
        report = f"## bits per byte (perplexity)\n\n{matrix(self.rows)}\n\n## all measures\n\n{table(self.rows)}\n"
        if self.prompting:
            summary, details, _ = prompting_report(self.prompting)
            report += f"\n## prompting accuracy\n\n{summary}\n\n{details}"
        for title, markdown, _ in self._sections():
            report += f"\n## {title}\n\n{markdown}\n"
        return report + f"\n## wall time (seconds)\n\n{self.timing()}\n"

    def timing(self) -> str:
        """Seconds per model and part (perplexity includes loading the model): where a slow evaluation goes."""
        models = list(dict.fromkeys(m for m, _ in self.seconds))
        parts = list(dict.fromkeys(p for _, p in self.seconds))
        lines = ["| model | " + " | ".join(parts) + " | total |", "|---|" + "---|" * (len(parts) + 1)]
        for m in models:
            cells = [self.seconds.get((m, p), 0.0) for p in parts]
            lines.append(f"| {m} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells):.1f} |")
        return "\n".join(lines)

    def summary(self) -> str:
        """What to print: the prompting accuracies, then the bits-per-byte matrix."""
        out = ""
        if self.prompting:
            out += f"evaluate: prompting accuracy\n\n{prompting_report(self.prompting)[0]}\n\n"
        out += (f"\nevaluate: bits per byte (perplexity per token), lower is better; each model reads the text "
                f"with its own tokenizer, so compare bits per byte across tokenizers\n\n{matrix(self.rows)}\n")
        if self.checks:
            out += "\nevaluate: " + "; ".join(c.title for c in self.checks if c.results) + " in results.md\n"
        return out + f"\nevaluate: wall time (seconds)\n\n{self.timing()}\n"


def evaluate_models(models: Mapping[str, Callable[[], ScoredModel]], sets: Mapping[str, HeldOut],
                    suites: Sequence[PromptSuite] = (), stride: Optional[int] = None, batch_size: int = 16,
                    device: str = "cpu", checks: Sequence[Check] = ()) -> Evaluation:
    """Each model, loaded in turn by its function and dropped after, on every set, every prompting task and
    every check."""
    out = Evaluation(documents={name: len(held.texts) for name, held in sets.items()}, checks=list(checks))
    for name, load in models.items():
        started = time.perf_counter()
        model = load()
        out.parameters[name] = model.parameters
        out.rows += evaluate_model(model, sets, stride, batch_size, device)
        out.seconds[(name, "perplexity")] = time.perf_counter() - started
        started = time.perf_counter()
        for suite in suites:
            out.prompting += [(name, result) for result in suite.evaluate(model, batch_size, device)]
        out.seconds[(name, "prompting")] = time.perf_counter() - started
        for check in out.checks:
            started = time.perf_counter()
            check.results.append((name, check.run(name, model)))
            out.seconds[(name, check.key)] = time.perf_counter() - started
        del model
    return out
