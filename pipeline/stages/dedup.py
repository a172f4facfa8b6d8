"""dedup: URL, exact, MinHash near-duplicate and line-level dedup; every removed document names its original."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf

from pipeline.config import typed
from pipeline.contract import StageContext, StageResult
from pipeline.data.sources import resolve_files
from pipeline.dedup.evaluate import EvalSpec, evaluate_near
from pipeline.dedup.io import read_documents, write_shards
from pipeline.dedup.minhash import NearSpec
from pipeline.dedup.plots import plot_clusters, plot_detection
from pipeline.dedup.run import LEVELS, DedupSpec, deduplicate
from pipeline.errors import BadInput

SECTIONS = ("dedup",)
SPEC_KEYS = ("url", "exact", "near", "lines", "keep", "quality_field")


def upstream(cfg: DictConfig) -> list[str]:
    return [cfg.dedup.input.stage] if cfg.dedup.input.stage else []


def read_input(cfg: DictConfig, ctx: StageContext) -> tuple[pa.Table, str]:
    """The documents to deduplicate: an upstream stage's kept shards, or files named by dedup.input.path."""
    i = cfg.dedup.input
    if bool(i.stage) == bool(i.path):
        raise BadInput("dedup.input: set exactly one of 'stage' (an upstream stage's kept documents) or 'path'")
    if i.stage:
        directory = ctx.inputs[i.stage].dir / "kept"
        label = f"the {i.stage} stage's kept documents ({directory})"
        files = resolve_files("dedup.input", str(directory), accept=lambda p: p.endswith(".parquet"), label=label)
    else:
        label = "dedup.input.path"
        files = resolve_files("dedup.input", i.path, label=label,
                              accept=lambda p: p.endswith((".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz")))
    return read_documents(files, label), label


def eval_texts(cfg: DictConfig, ctx: StageContext, table: pa.Table) -> list[str]:
    """The evaluation's corpus: the input, plus the filter's rejected pages with text when asked for."""
    texts = [t for t in table.column("text").to_pylist() if t and t.strip()]
    if cfg.dedup.eval.include_filter_rejected and cfg.dedup.input.stage == "filter":
        directory = ctx.inputs["filter"].dir / "rejected"
        rejected = read_documents(resolve_files("dedup.eval", str(directory), accept=lambda p: p.endswith(".parquet"),
                                                label=f"the filter stage's rejected documents ({directory})"),
                                  "filter rejected documents")
        texts += [t for t in rejected.column("text").to_pylist() if t and t.strip()]
    return texts


def evaluate(cfg: DictConfig, ctx: StageContext, table: pa.Table) -> dict:
    """Precision and recall of near-duplicate detection; logs the report, the plot and the figures."""
    near = typed(cfg.dedup.near, NearSpec, "dedup.near")
    report = evaluate_near(eval_texts(cfg, ctx, table), near, typed(cfg.dedup.eval, EvalSpec, "dedup.eval"))
    (ctx.build_dir / "near_eval.json").write_text(json.dumps(report, indent=1) + "\n")
    ctx.run.log_artifact(ctx.build_dir / "near_eval.json")
    ctx.run.log_artifact(plot_detection(report, ctx.build_dir / "near_detection.png"))
    metrics = {"dedup_eval/documents": report["documents"], "dedup_eval/planted": report["planted"]}
    for part in ("overall", "real", "planted_pairs"):
        prefix = "dedup_eval" if part == "overall" else f"dedup_eval/{part.split('_')[0]}"
        for key in ("precision", "recall", "true_pairs", "detected_pairs"):
            value = report[part][key]
            if value == value:  # NaN when there is nothing to divide by
                metrics[f"{prefix}/{key}"] = value
    for rate, row in report["by_edit_rate"].items():
        metrics[f"dedup_eval/detected_at_edit_rate/{rate}"] = row["detected"]
    ctx.run.log_metrics(metrics)
    summary = {k: report[k] for k in ("threshold", "bands", "rows", "verify", "documents", "planted",
                                      "sampled_documents", "overall", "real", "planted_pairs", "by_edit_rate")}
    return summary


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    d = cfg.dedup
    spec = typed({k: OmegaConf.to_container(d[k], resolve=True) if OmegaConf.is_config(d[k]) else d[k]
                  for k in SPEC_KEYS}, DedupSpec, "dedup")
    table, label = read_input(cfg, ctx)
    result = deduplicate(table, spec, label=label)
    s = result.stats

    kept_files = write_shards(result.kept, ctx.build_dir / "kept", d.rows_per_shard)
    removed_files = write_shards(result.removed, ctx.build_dir / "removed", d.rows_per_shard)
    (ctx.build_dir / "boilerplate_lines.json").write_text(
        json.dumps([{"line": line, "documents": n} for line, n in s.get("lines_top", [])], indent=1,
                   ensure_ascii=False) + "\n")
    ctx.run.log_artifact(ctx.build_dir / "boilerplate_lines.json")
    ctx.run.log_artifact(plot_clusters(s["cluster_sizes"], s["removed"], ctx.build_dir / "clusters.png"))

    n = s["input"]
    removed = sum(s["removed"].values())
    metrics = {"dedup/input_documents": n, "dedup/kept_documents": s["kept"], "dedup/removed_documents": removed,
               "dedup/kept_fraction": s["kept"] / max(n, 1),
               "dedup/clusters": sum(c for size, c in s["cluster_sizes"].items() if size > 1),
               "dedup/largest_cluster": max(s["cluster_sizes"], default=0),
               **{f"dedup/removed/{lv}": c for lv, c in s["removed"].items()},
               **{f"dedup/removed_fraction/{lv}": c / max(n, 1) for lv, c in s["removed"].items()}}
    for key in ("near_pairs", "near_too_short", "near_indexed", "near_signature_docs_per_s", "near_index_seconds",
                "url_missing", "lines_frequent", "lines_removed"):
        if key in s:
            metrics[f"dedup/{key.replace('_', '/', 1)}"] = s[key]
    counts = {"input": n, "kept": s["kept"], "removed": removed, "removed_by_level": s["removed"],
              "cluster_sizes": {str(k): v for k, v in s["cluster_sizes"].items()},
              "near": {k: s[k] for k in ("near_bands", "near_rows", "near_pairs", "near_indexed", "near_too_short")
                       if k in s},
              "lines": {k: s[k] for k in ("lines_frequent", "lines_removed") if k in s}}
    outputs = {"kept": [f"kept/{f}" for f in kept_files], "removed": [f"removed/{f}" for f in removed_files],
               "plot": "clusters.png", "boilerplate_lines": "boilerplate_lines.json"}
    if d.eval.enabled:
        counts["near_eval"] = evaluate(cfg, ctx, table)
        outputs.update(near_eval="near_eval.json", near_detection_plot="near_detection.png")
    assert counts["kept"] + counts["removed"] == n and set(s["removed"]) == set(LEVELS)
    return StageResult(counts=counts, metrics=metrics, outputs=outputs)
