"""dedup: URL, exact, MinHash near-duplicate and line-level dedup; every removed document names its original."""
from __future__ import annotations

from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.dedup.io import eval_texts, read_input, write_parts
from pipeline.dedup.report import dedup_counts, dedup_metrics, dedup_warnings, near_eval, write_dedup_reports
from pipeline.dedup.run import deduplicate

SECTIONS = ("dedup",)


def upstream(cfg: StageConfig) -> list[str]:
    return [cfg.dedup.input.stage] if cfg.dedup.input.stage else []


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    d = cfg.dedup
    docs = read_input(d.input, ctx.input_dirs)
    result = deduplicate(docs.table, d, label=docs.label)

    outputs = write_parts({"kept": result.kept, "removed": result.removed}, ctx.build_dir, d.rows_per_shard)
    for path in write_dedup_reports(result.stats, ctx.build_dir):
        ctx.run.log_artifact(path)
    outputs.update(plot="clusters.png", boilerplate_lines="boilerplate_lines.json")
    counts = dedup_counts(result.stats)
    if d.eval.enabled:
        evaluation = near_eval(eval_texts(docs, d.eval), d.near, d.eval, ctx.build_dir)
        for path in evaluation.files:
            ctx.run.log_artifact(path)
        ctx.run.log_metrics(evaluation.metrics)
        counts["near_eval"] = evaluation.summary
        outputs.update(near_eval="near_eval.json", near_detection_plot="near_detection.png")
    return StageResult(counts=counts, metrics=dedup_metrics(result.stats), outputs=outputs,
                       warnings=dedup_warnings(result.stats))
