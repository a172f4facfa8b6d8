"""filter: crawl pages in, clean documents out; every rejected document keeps the rule that removed it.

Every document's scores are kept (scores/), so a run that changes only thresholds (e.g.
``filter.gopher.min_words=100``) applies them to the scores of the output it replaces, without
reading or extracting the crawl again.
"""
from __future__ import annotations

from pipeline.config import as_plain
from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.files import file_hash
from pipeline.errors import BadInput
from pipeline.filter.report import OUTPUTS, filter_counts, filter_metrics, filter_warnings, write_filter_reports
from pipeline.filter.run import run_filter
from pipeline.filter.steps import AFTER_SCORING_KEYS, list_files

SECTIONS = ("filter",)


def upstream(cfg: StageConfig) -> list[str]:
    return []


def fingerprint(cfg: StageConfig) -> dict:
    """The contents of the word and URL lists and URL indexes the config names, so editing one is a new config."""
    indexes = [s.url_index for s in cfg.filter.sources.values() if s.url_index]
    out = {}
    for path in [*list_files(cfg.filter), *indexes]:
        try:
            out[path] = file_hash(path)
        except OSError as e:
            raise BadInput(f"filter: the list {path} named in the config cannot be read ({e.strerror})") from None
    return out


def scoring_settings(cfg: StageConfig) -> dict:
    """Everything the scores depend on: the filter's settings but those read after scoring (thresholds, PII),
    the sizes of Gopher's n-gram rules (which values are measured), and the lists' contents."""
    plain = as_plain(cfg.filter)
    for key in ("samples_per_rule", "reuse_scores"):
        plain.pop(key)
    for section, keys in AFTER_SCORING_KEYS.items():
        for key in keys:
            plain[section].pop(key)
    gopher = cfg.filter.gopher
    plain["gopher_ngrams"] = {"top": sorted(map(int, gopher.max_top_ngram_char_fraction)),
                              "duplicate": sorted(map(int, gopher.max_duplicate_ngram_char_fraction))}
    return {"settings": plain, "lists": fingerprint(cfg)}


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    f = cfg.filter  # a FilterConfig is the steps' settings (StepsSpec) plus the sources and the pool
    stats = run_filter(f.sources, f, ctx.build_dir, num_proc=f.num_proc, samples_per_rule=f.samples_per_rule,
                       scoring=scoring_settings(cfg), previous=ctx.published if f.reuse_scores else None)
    if stats["scores"]["rethresholded_from"]:
        print("filter: only thresholds changed: applied them to the stored scores (no input read)", flush=True)
    unusable = [f"the stored scores could not be reused ({stats['scores']['unusable']}): the input was read "
                f"and scored again"] if stats["scores"].get("unusable") else []
    for path in write_filter_reports(stats, ctx.build_dir):
        ctx.run.log_artifact(path)
    return StageResult(counts=filter_counts(stats), metrics=filter_metrics(stats), outputs=OUTPUTS,
                       warnings=unusable + filter_warnings(stats))
