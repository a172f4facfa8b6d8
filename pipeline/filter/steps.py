"""The filter's steps in order, applied to one record: each record ends kept or rejected by one rule.

read -> urls -> extract -> langid -> gopher -> c4 -> (toxicity, when it rejects); kept documents
then get PII redaction and the toxicity flag. A switched-off step is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from pipeline.filter.extract import TEXT_TYPES, ExtractSpec, UndecodableError, decode_html, extract_text
from pipeline.filter.langid import LangIdSpec, identify
from pipeline.filter.pii import PiiSpec, redact
from pipeline.filter.quality import (C4Spec, GopherSpec, count_listed, document_metrics, first_failure,
                                     listed_hits, load_word_list, normalise_words, rules)
from pipeline.filter.records import Record
from pipeline.filter.urls import UrlSpec, build_lists

STEPS = ("read", "urls", "extract", "langid", "gopher", "c4", "toxicity")


@dataclass
class ToxicitySpec:
    enabled: bool = True
    words_file: Optional[str] = None  # one word or phrase per line
    min_hits: int = 1  # flagged when a document holds at least this many listed words
    reject: bool = False  # False: only flag (columns toxic, toxic_words); True: reject flagged documents


@dataclass
class StepsSpec:
    """Every step's settings, in the order the steps run."""

    urls: UrlSpec = field(default_factory=UrlSpec)
    extract: ExtractSpec = field(default_factory=ExtractSpec)
    langid: LangIdSpec = field(default_factory=LangIdSpec)
    gopher: GopherSpec = field(default_factory=GopherSpec)
    c4: C4Spec = field(default_factory=C4Spec)
    pii: PiiSpec = field(default_factory=PiiSpec)
    toxicity: ToxicitySpec = field(default_factory=ToxicitySpec)


@dataclass
class Outcome:
    """What became of one record."""

    record: Record
    text: Optional[str] = None
    lang: Optional[str] = None
    lang_score: Optional[float] = None
    metrics: Dict[str, Optional[float]] = field(default_factory=dict)
    rule: Optional[str] = None  # None: kept
    value: Optional[float] = None
    limit: Optional[float] = None
    detail: str = ""
    pii: Dict[str, int] = field(default_factory=dict)
    toxic_words: int = 0

    @property
    def kept(self) -> bool:
        return self.rule is None

    @property
    def step(self) -> Optional[str]:
        return None if self.rule is None else self.rule.split(".", 1)[0]


class Filter:
    """Built once per worker from the specs; ``__call__`` decides one record."""

    def __init__(self, spec: StepsSpec):
        self.spec = spec
        self.block, self.optout = build_lists(spec.urls) if spec.urls.enabled else (None, None)
        self.gopher = spec.gopher if spec.gopher.enabled else None
        self.c4 = spec.c4 if spec.c4.enabled else None
        self.bad_words = load_word_list(spec.c4.bad_words_file) if self.c4 and spec.c4.bad_words_file else []
        self.toxic_words = (load_word_list(spec.toxicity.words_file)
                            if spec.toxicity.enabled and spec.toxicity.words_file else [])
        self.rules = rules(self.gopher, self.c4)
        self.languages = set(spec.langid.languages)

    def metric_names(self) -> List[str]:
        probe = document_metrics("a b", "en", self.gopher, self.c4, ["x"] if self.bad_words else [])
        return list(probe)

    def __call__(self, record: Record) -> Outcome:
        out = Outcome(record)
        if record.error:
            return self._reject(out, f"read.{record.error}", detail=record.error_detail)
        if self.block is not None:
            hit = self.block.match(record.url)
            if hit:
                return self._reject(out, "urls.blocklist", detail=hit)
            hit = self.optout.match(record.url)
            if hit:
                return self._reject(out, "urls.optout", detail=hit)
        if not self._text(out):
            return out
        if self.spec.langid.enabled:
            out.lang, out.lang_score = identify(out.text, self.spec.langid.max_chars)
            if self.languages and out.lang not in self.languages:
                return self._reject(out, "langid.language", value=out.lang_score, detail=out.lang)
            if out.lang_score < self.spec.langid.min_score:
                return self._reject(out, "langid.min_score", value=out.lang_score, limit=self.spec.langid.min_score,
                                    detail=out.lang)
        if self.rules:
            out.metrics = document_metrics(out.text, out.lang, self.gopher, self.c4, self.bad_words)
            failed = first_failure(out.metrics, self.rules)
            if failed is not None:
                detail = self._which_words(out.text, self.bad_words) if failed.name == "c4.bad_words" else ""
                return self._reject(out, failed.name, value=out.metrics[failed.metric], limit=failed.limit,
                                    detail=detail)
        if self.toxic_words:
            out.toxic_words = count_listed(normalise_words(out.text), out.text.lower(), self.toxic_words)
            if self.spec.toxicity.reject and out.toxic_words >= self.spec.toxicity.min_hits:
                return self._reject(out, "toxicity.words", value=out.toxic_words, limit=self.spec.toxicity.min_hits,
                                    detail=self._which_words(out.text, self.toxic_words))
        if self.spec.pii.enabled:
            out.text, out.pii = redact(out.text, self.spec.pii)
        return out

    def _text(self, out: Outcome) -> bool:
        """Set ``out.text`` from the record; False (and the outcome rejected) when there is none."""
        record, spec = out.record, self.spec.extract
        if record.text is not None:
            out.text = record.text
        else:
            if record.content_type not in TEXT_TYPES:
                self._reject(out, "extract.content_type", detail=record.content_type or "")
                return False
            try:
                html, _ = decode_html(record.html, record.charset, spec.max_invalid_char_fraction)
            except UndecodableError as e:
                self._reject(out, "extract.undecodable", detail=str(e))
                return False
            if not spec.enabled:
                out.text = html
            else:
                try:
                    out.text = extract_text(html, spec)
                except Exception as e:  # an extractor's crash on one page must not stop the corpus
                    self._reject(out, "extract.error", detail=f"{type(e).__name__}: {e}")
                    return False
        chars = len(out.text.strip())
        if chars < max(spec.min_chars, 1):
            self._reject(out, "extract.no_text", value=chars, limit=max(spec.min_chars, 1))
            return False
        return True

    @staticmethod
    def _which_words(text: str, listed: List[str]) -> str:
        hits = listed_hits(normalise_words(text), text.lower(), listed)
        return ", ".join(f"{w} ({n})" for w, n in hits.most_common(10))

    @staticmethod
    def _reject(out: Outcome, rule: str, value: Any = None, limit: Any = None, detail: str = "") -> Outcome:
        out.rule, out.value, out.limit, out.detail = rule, value, limit, detail
        return out
