"""filter: crawl pages in, clean documents out; every rejected document keeps the rule that removed it.

Every document's scores are kept (scores/), so a run that changes only thresholds (e.g.
``filter.gopher.min_words=100``) applies them to the scores of the output it replaces, without
reading or extracting the crawl again.
"""
from __future__ import annotations

from pipeline.config import as_plain
from pipeline.contract import StageConfig, StageContext, StageResult, file_hash
from pipeline.errors import BadInput
from pipeline.filter.report import OUTPUTS, filter_counts, filter_metrics, filter_warnings, write_filter_reports
from pipeline.filter.run import run_filter
from pipeline.filter.steps import THRESHOLD_KEYS, list_files

SECTIONS = ("filter",)


def upstream(cfg: StageConfig) -> list[str]:
    return []


def fingerprint(cfg: StageConfig) -> dict:
    """The contents of the word and URL lists the config names, so editing a list is a new config."""
    out = {}
    for path in list_files(cfg.filter):
        try:
            out[path] = file_hash(path)
        except OSError as e:
            raise BadInput(f"filter: the list {path} named in the config cannot be read ({e.strerror})") from None
    return out


def scoring_settings(cfg: StageConfig) -> dict:
    """Everything the scores depend on: the filter's settings without its thresholds, and the lists' contents."""
    plain = as_plain(cfg.filter)
    plain.pop("samples_per_rule")
    for section, keys in THRESHOLD_KEYS.items():
        for key in keys:
            plain[section].pop(key)
    return {"settings": plain, "lists": fingerprint(cfg)}


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    f = cfg.filter  # a FilterConfig is the steps' settings (StepsSpec) plus the sources and the pool
    stats = run_filter(f.sources, f, ctx.build_dir, num_proc=f.num_proc, samples_per_rule=f.samples_per_rule,
                       scoring=scoring_settings(cfg), previous=ctx.published)
    if stats["scores"]["rethresholded_from"]:
        print("filter: only thresholds changed: applied them to the stored scores (no input read)", flush=True)
    for path in write_filter_reports(stats, ctx.build_dir):
        ctx.run.log_artifact(path)
    return StageResult(counts=filter_counts(stats), metrics=filter_metrics(stats), outputs=OUTPUTS,
                       warnings=filter_warnings(stats))
