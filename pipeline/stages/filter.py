"""filter: crawl pages in, clean documents out; every rejected document keeps the rule that removed it."""
from __future__ import annotations

from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.filter.report import OUTPUTS, filter_counts, filter_metrics, filter_warnings, write_filter_reports
from pipeline.filter.run import run_filter

SECTIONS = ("filter",)


def upstream(cfg: StageConfig) -> list[str]:
    return []


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    f = cfg.filter  # a FilterConfig is the steps' settings (StepsSpec) plus the sources and the pool
    stats = run_filter(f.sources, f, ctx.build_dir, num_proc=f.num_proc, samples_per_rule=f.samples_per_rule)
    for path in write_filter_reports(stats, ctx.build_dir):
        ctx.run.log_artifact(path)
    return StageResult(counts=filter_counts(stats), metrics=filter_metrics(stats), outputs=OUTPUTS,
                       warnings=filter_warnings(stats))
