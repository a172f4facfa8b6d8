"""The quality-rule step alone (pages/s): C4's line-level rules and Gopher's definitions vs the code they replaced.

Both sides judge the same pages: the extracted text of every demo page that reaches the quality rules
(taken from a filter run's stored scores), with each version's default thresholds and bad-words list.
Baseline: ``pipeline/filter/quality.py`` as it was at commit ``BASELINE`` (document-level C4 fractions, a
12-term starter list), loaded from git history. Candidate: today's ``document_metrics`` and rules
(C4's line removal, then page rules; LDNOOBW lists per language). Measurements alternate so machine
load hits both alike; the median of the runs is reported.
"""
from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline import PROJECT_ROOT
from pipeline.bench.filter_rethreshold import demo_filter, filtered
from pipeline.errors import PipelineError
from pipeline.filter.quality import BadWords, document_metrics, first_failure, rules

GOAL = 0.8
BASELINE = "f747ac4"  # the last commit with the document-level C4 step


def _git_show(path: str) -> str:
    proc = subprocess.run(["git", "show", f"{BASELINE}:{path}"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise PipelineError(f"the baseline needs {path} at commit {BASELINE} from git history "
                            f"({proc.stderr.strip() or 'git failed'}); run it in a full clone")
    return proc.stdout


def _baseline(tmp: Path):
    """The old quality module, and its rule step as a function of (text, lang)."""
    (tmp / "old_quality.py").write_text(_git_show("pipeline/filter/quality.py"))
    (tmp / "bad-words-en.txt").write_text(_git_show("conf/filter/wordlists/bad-words-en.txt"))
    spec = importlib.util.spec_from_file_location("old_quality", tmp / "old_quality.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_quality"] = old  # dataclasses look their module up while the class is made
    spec.loader.exec_module(old)
    gopher, c4 = old.GopherSpec(), old.C4Spec(bad_words_file=str(tmp / "bad-words-en.txt"))
    words, checked = old.load_word_list(c4.bad_words_file), old.rules(gopher, c4)
    return lambda text, lang: old.first_failure(old.document_metrics(text, lang, gopher, c4, words), checked)


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    cfg = demo_filter(quick, list(overrides))
    f = cfg.filter
    gopher, c4 = f.gopher, f.c4
    bad, checked = BadWords(c4.bad_words), rules(gopher, c4)

    def candidate(text: str, lang: str):
        return first_failure(document_metrics(text, lang, gopher, c4, bad)[0], checked)

    with tempfile.TemporaryDirectory(prefix="bench-rules-") as tmp:
        tmp = Path(tmp)
        baseline = _baseline(tmp)
        filtered(cfg, tmp / "out")
        pages = [(r["text"], r["lang"]) for p in sorted((tmp / "out" / "scores").glob("*.parquet"))
                 for r in pq.read_table(p, columns=["text", "lang"]).to_pylist()]
    repeats = 3 if quick else 5

    def rate(judge) -> float:
        started = time.perf_counter()
        for text, lang in pages:
            judge(text, lang)
        return len(pages) / (time.perf_counter() - started)

    old_runs, new_runs = [], []
    for _ in range(repeats):
        old_runs.append(rate(baseline))
        new_runs.append(rate(candidate))
    old, new = statistics.median(old_runs), statistics.median(new_runs)
    return {
        "name": "filter_rules",
        "what": "pages/s through the quality rules alone (Gopher + C4 + bad words), same pages on both sides",
        "corpus": {"pages": len(pages), "chars": sum(len(t) for t, _ in pages), "quick": quick},
        "baseline": {"name": f"quality.py at {BASELINE} (document-level C4)", "pages_per_s": round(old, 1),
                     "runs": [round(x, 1) for x in old_runs]},
        "candidate": {"name": "C4 line removal + page rules, Gopher as published, LDNOOBW",
                      "pages_per_s": round(new, 1), "runs": [round(x, 1) for x in new_runs]},
        "overrides": list(overrides),
        "ratio": round(new / old, 3),
        "goal": GOAL,
        "meets_goal": new / old >= GOAL,
    }
