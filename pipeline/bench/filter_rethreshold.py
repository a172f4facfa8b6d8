"""Re-thresholding (documents/s): the filter applied to stored scores vs a full filter run, on the demo crawl.

Baseline: ``run_filter`` on the demo's sources with ``filter.gopher.min_words=100`` (reads every WARC,
HTML and JSONL file, extracts, identifies the language, scores). Candidate: the same thresholds applied
to the scores a full run with the default thresholds stored (what ``make filter ARGS=...`` does when
only thresholds change). The two outputs are compared row by row; the result says whether they match.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import compose
from pipeline.contract import stage_config
from pipeline.filter.run import CrawlSource, run_filter
from pipeline.stages import filter as filter_stage

GOAL = 20.0
REPEATS = 3
CHANGED = ("gopher", "min_words", 100)


def demo_filter(quick: bool, overrides: list[str]):
    """The demo's filter config (a few files per source with ``quick``)."""
    cfg = compose(*overrides)
    if quick:
        cfg.filter.sources = {name: CrawlSource(**{**vars(spec), "max_files": 12})
                              for name, spec in cfg.filter.sources.items()}
    return cfg


def filtered(cfg, out: Path, previous: Path | None = None) -> tuple[dict, float]:
    """(stats, seconds) of one run_filter into ``out``, scored with the stage's own scoring settings."""
    f = cfg.filter
    scoring = filter_stage.scoring_settings(stage_config("filter", filter_stage, cfg))
    started = time.perf_counter()
    stats = run_filter(f.sources, f, out, num_proc=f.num_proc, samples_per_rule=f.samples_per_rule,
                       scoring=scoring, previous=previous)
    return stats, time.perf_counter() - started


def same_output(a: Path, b: Path) -> bool:
    """Every kept and rejected shard holds the same rows, in the same order."""
    for part in ("kept", "rejected"):
        names = sorted(p.name for p in (a / part).glob("*.parquet"))
        if names != sorted(p.name for p in (b / part).glob("*.parquet")):
            return False
        if any(not pq.read_table(a / part / n).equals(pq.read_table(b / part / n)) for n in names):
            return False
    return True


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    cfg = demo_filter(quick, list(overrides))
    changed = copy.deepcopy(cfg)
    section, key, value = CHANGED
    setattr(getattr(changed.filter, section), key, value)
    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        tmp = Path(tmp)
        _, _ = filtered(cfg, tmp / "scored")  # stores the scores, default thresholds
        full, full_s = filtered(changed, tmp / "full")
        runs = []
        for i in range(REPEATS):  # it takes under a second: the median of a few, against machine noise
            again, seconds = filtered(changed, tmp / f"rethresholded-{i}", previous=tmp / "scored")
            assert again["scores"]["rethresholded_from"], "the stored scores were not used"
            runs.append(seconds)
        again_s = statistics.median(runs)
        identical = all(same_output(tmp / "full", tmp / f"rethresholded-{i}") for i in range(REPEATS))
    n = sum(s["input"] for s in full["per_source"].values())
    kept = sum(s["kept"] for s in full["per_source"].values())
    return {
        "name": "filter_rethreshold",
        "what": f"documents/s: filter.{section}.{key}={value} applied to stored scores vs a full filter run",
        "corpus": {"documents": n, "kept": kept, "sources": sorted(cfg.filter.sources), "quick": quick},
        "baseline": {"name": f"full run (num_proc={cfg.filter.num_proc})", "docs_per_s": round(n / full_s, 1),
                     "runs": [round(full_s, 2)]},
        "candidate": {"name": f"thresholds on stored scores, median of {REPEATS}", "docs_per_s": round(n / again_s, 1),
                      "runs": [round(x, 2) for x in runs]},
        "identical_output": identical,
        "note": f"full {full_s:.1f} s, re-thresholded {again_s:.2f} s; output identical to the full run: {identical}",
        "overrides": list(overrides),
        "ratio": round(full_s / again_s, 2),
        "goal": GOAL,
        "meets_goal": full_s / again_s >= GOAL and identical,
    }
