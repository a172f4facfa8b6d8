"""Line-level dedup: lines that recur in many documents (navigation, cookie notices, footers) are cut.

Section headings are structure, not boilerplate: "Abstract" over "========" recurs in hundreds of PEPs
because they are well formed. With ``keep_headings`` they are neither counted nor removed.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from tqdm.auto import tqdm

from pipeline.dedup.text import SPACE
from pipeline.errors import check

ADORNMENT = frozenset("=-`:.'\"~^_*+#")  # docutils' recommended section title adornment characters
ATX_HEADING = re.compile(r" {0,3}#{1,6}(?:\s|$)")  # Markdown '# Title' (CommonMark: at most 3 spaces before)
TITLE = re.compile(r"[^\W_]")  # a title has a letter or digit
MAX_TITLE_WORDS = 8  # longer "headings" are code comments or notices ('# Copyright (c) ... All rights reserved.')
MARKUP_START = ADORNMENT | frozenset(" \t")  # lines starting otherwise are not headings' markup: skipped fast


@dataclass
class LinesSpec:
    enabled: bool = True
    min_documents: int = 5  # a line found in at least this many documents is removed from all of them
    min_line_chars: int = 1  # shorter lines (after trimming) are never counted or removed
    min_chars: int = 1  # a document left with fewer characters is removed (level "lines")
    keep_headings: bool = True  # section headings ('# Title', underlined reST/setext titles): never counted or cut
    report_top: int = 100  # most frequent removed lines (and kept headings) written to boilerplate_lines.json

    def __post_init__(self):
        check(self.min_documents >= 2, "min_documents", self.min_documents, "at least 2")


@dataclass
class FrequentLines:
    """Normalised line -> number of documents containing it, for lines in at least min_documents documents."""
    boilerplate: Counter  # removed
    headings: Counter  # section headings (keep_headings): kept, and not counted in boilerplate


def _key(line: str) -> str:
    return SPACE.sub(" ", line).strip().lower()


def _is_title(text: str) -> bool:
    """A section title: a letter or digit, at most MAX_TITLE_WORDS words, no full stop at the end."""
    text = text.strip()
    return bool(TITLE.search(text)) and len(text.split()) <= MAX_TITLE_WORDS and not text.endswith(".")


def heading_rows(lines: Sequence[str]) -> set[int]:
    """Rows of section headings: Markdown '# Title', and a title after a blank line (or an adornment) with an
    underline, maybe an overline too, of one adornment character repeated at least the title's length
    (reStructuredText, Markdown setext)."""
    rows = set()
    for i, line in enumerate(lines):
        if line[:1] not in MARKUP_START:
            continue
        mark = line.strip()
        if mark[:1] == "#" and ATX_HEADING.match(line) and _is_title(mark.lstrip("#")):
            rows.add(i)
        if not i or mark[:1] not in ADORNMENT or mark != mark[0] * len(mark):
            continue
        title = lines[i - 1].strip()
        above = lines[i - 2].strip() if i >= 2 else ""
        if len(title) <= len(mark) and _is_title(title) and (
                not above or (above[0] in ADORNMENT and above == above[0] * len(above))):
            rows.update((i - 1, i, i - 2) if above == mark else (i - 1, i))
    return rows


def frequent_lines(texts: Sequence[str], spec: LinesSpec, progress: bool = True) -> FrequentLines:
    """The lines to remove and, apart, the section headings that recur as often (kept, reported)."""
    counts, headings, shortest = Counter(), Counter(), spec.min_line_chars
    for text in tqdm(texts, desc="Line counts", unit="doc", disable=not progress):
        lines = text.split("\n")
        protected = heading_rows(lines) if spec.keep_headings else ()
        counts.update({k for i, k in enumerate(map(_key, lines)) if i not in protected and len(k) >= shortest})
        headings.update({k for k in (_key(lines[i]) for i in protected) if len(k) >= shortest})
    boilerplate = Counter({k: n for k, n in counts.items() if n >= spec.min_documents})
    return FrequentLines(boilerplate, Counter({k: n for k, n in headings.items() if n >= spec.min_documents}))


def remove_lines(text: str, frequent: FrequentLines, spec: LinesSpec) -> tuple[str, int, int]:
    """(text without the frequent lines, number of lines removed, number of frequent headings kept)."""
    lines = text.split("\n")
    protected = heading_rows(lines) if spec.keep_headings else ()
    kept, removed, headings = [], 0, 0
    for i, line in enumerate(lines):
        key = _key(line)
        if i in protected:
            kept.append(line)
            headings += key in frequent.headings
        elif len(key) >= spec.min_line_chars and key in frequent.boilerplate:
            removed += 1
        else:
            kept.append(line)
    return ("\n".join(kept).strip("\n") if removed else text), removed, headings
