"""Line-level dedup: lines that recur in many documents (navigation, cookie notices, footers) are cut."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from tqdm.auto import tqdm

from pipeline.dedup.text import SPACE
from pipeline.errors import check


@dataclass
class LinesSpec:
    enabled: bool = True
    min_documents: int = 5  # a line found in at least this many documents is removed from all of them
    min_line_chars: int = 1  # shorter lines (after trimming) are never counted or removed
    min_chars: int = 1  # a document left with fewer characters is removed (level "lines")
    report_top: int = 100  # most frequent removed lines written to boilerplate_lines.json

    def __post_init__(self):
        check(self.min_documents >= 2, "min_documents", self.min_documents, "at least 2")


def _key(line: str) -> str:
    return SPACE.sub(" ", line).strip().lower()


def frequent_lines(texts: Sequence[str], spec: LinesSpec, progress: bool = True) -> Counter:
    """Normalised line -> number of documents containing it, for lines in at least min_documents documents."""
    counts: Counter = Counter()
    for text in tqdm(texts, desc="Line counts", unit="doc", disable=not progress):
        counts.update({k for k in map(_key, text.split("\n")) if len(k) >= spec.min_line_chars})
    return Counter({k: c for k, c in counts.items() if c >= spec.min_documents})


def remove_lines(text: str, frequent: Counter, spec: LinesSpec) -> tuple[str, int]:
    """(text without the frequent lines, number of lines removed)."""
    kept, removed = [], 0
    for line in text.split("\n"):
        key = _key(line)
        if len(key) >= spec.min_line_chars and key in frequent:
            removed += 1
        else:
            kept.append(line)
    return ("\n".join(kept).strip("\n") if removed else text), removed
