"""The filter's steps: each is built once from its spec and answers, for one document, keep or drop.

``build_steps`` turns a ``StepsSpec`` into the ordered list, leaving switched-off steps out:

    read -> urls -> extract -> langid -> score -> thresholds (gopher, c4, toxicity) -> pii

A step is called with a ``Doc`` and returns ``KEEP`` (None) or a ``Drop`` that names the rule, the
measured value, the limit and a detail. It may enrich the document on the way (extracted text,
language, scores, redacted text). ``score`` measures every quality rule's value and never drops;
``thresholds`` judges those values, so stored scores can be judged again with other thresholds by
the steps from ``thresholds`` on (``after_scoring``). The caller runs the steps in order, stops at the
first drop and does the bookkeeping: it counts reasons, writes rejected documents with theirs and
computes the funnel. Optional packages are imported when a step is built, so a missing or broken
install fails at once, naming what to install, instead of rejecting every page.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Protocol, Sequence

from pipeline.errors import PipelineError, check
from pipeline.filter.extract import PIP, TEXT_TYPES, Engine, ExtractSpec, UndecodableError, decode_html, html_to_text
from pipeline.filter.langid import LangIdSpec, identify, known_languages
from pipeline.filter.pii import PiiSpec, redact
from pipeline.filter.quality import THRESHOLD_KEYS as QUALITY_THRESHOLDS
from pipeline.filter.quality import (BadWords, C4Spec, GopherSpec, bad_word_lists, c4_text, count_listed,
                                     document_metrics, first_failure, listed_hits, load_word_list, normalise_words,
                                     rules)
from pipeline.filter.records import Record
from pipeline.filter.urls import UrlSpec, build_lists

# The funnel's stages in order: every drop's rule starts with one of these ("gopher.min_words").
STEPS = ("read", "urls", "extract", "langid", "gopher", "c4", "toxicity")


@dataclass
class ToxicitySpec:
    enabled: bool = True
    words_file: Optional[str] = None  # one word or phrase per line
    min_hits: int = 1  # flagged when a document holds at least this many listed words
    reject: bool = False  # False: only flag (columns toxic, toxic_words); True: reject flagged documents

    def __post_init__(self):
        check(self.min_hits >= 1, "min_hits", self.min_hits, "at least 1")


@dataclass
class StepsSpec:
    """Every step's settings; build_steps gives the order the steps run in."""

    # read: a larger record (WARC record block, HTML file, JSONL line, Parquet text/html value) is rejected
    # as read.too_large before it is decoded or extracted; null: no limit
    max_document_bytes: Optional[int] = 5 * 2**20
    urls: UrlSpec = field(default_factory=UrlSpec)
    extract: ExtractSpec = field(default_factory=ExtractSpec)
    langid: LangIdSpec = field(default_factory=LangIdSpec)
    gopher: GopherSpec = field(default_factory=GopherSpec)
    c4: C4Spec = field(default_factory=C4Spec)
    pii: PiiSpec = field(default_factory=PiiSpec)
    toxicity: ToxicitySpec = field(default_factory=ToxicitySpec)

    def __post_init__(self):
        check(self.max_document_bytes is None or self.max_document_bytes >= 1, "max_document_bytes",
              self.max_document_bytes, "at least 1 or null")


# The keys only the steps after scoring read (thresholds, and PII redaction of the kept text): a change is
# applied to stored scores, nothing is read again.
AFTER_SCORING_KEYS = {**QUALITY_THRESHOLDS, "toxicity": {"min_hits", "reject"},
                      "pii": set(PiiSpec.__dataclass_fields__)}


def list_files(spec: StepsSpec) -> List[str]:
    """The files whose contents the enabled steps read besides the input: URL and word lists."""
    paths = [*spec.urls.blocklist_files, *spec.urls.optout_files] if spec.urls.enabled else []
    if spec.toxicity.enabled and spec.toxicity.words_file:
        paths.append(spec.toxicity.words_file)
    if spec.c4.enabled and spec.c4.bad_words:
        paths += list(bad_word_lists(spec.c4.bad_words).values()) or [spec.c4.bad_words]
    return paths


@dataclass
class Doc:
    """One record on its way through the steps, with what they found out about it."""

    record: Record
    text: Optional[str] = None  # set by extract; redacted by pii
    lang: Optional[str] = None
    lang_score: Optional[float] = None
    scored: bool = False  # set by score: the document reached the quality rules
    metrics: Dict[str, Optional[float]] = field(default_factory=dict)
    c4_lines: Optional[List[int]] = None  # the lines C4 keeps (indices in text.splitlines()); None: C4 is off
    toxic_words: int = 0
    toxic: bool = False
    redacted: Optional[str] = None  # set by pii: the kept text with placeholders
    pii: Dict[str, int] = field(default_factory=dict)  # kind -> placeholders put in

    @property
    def kept_text(self) -> str:
        """The text a kept document is written with: after C4's line removal, and redacted."""
        if self.redacted is not None:
            return self.redacted
        return self.text if self.c4_lines is None else c4_text(self.text, self.c4_lines)


@dataclass(frozen=True)
class Drop:
    """Why a document is rejected: ``rule`` is "<funnel stage>.<rule>", e.g. gopher.min_words."""

    rule: str
    value: Optional[float] = None  # what was measured
    limit: Optional[float] = None  # the threshold it broke
    detail: str = ""

    @property
    def step(self) -> str:
        return self.rule.split(".", 1)[0]


KEEP = None


class Step(Protocol):
    name: str

    def __call__(self, doc: Doc) -> Optional[Drop]: ...


class ReadErrors:
    """Records the reader could not read (truncated, corrupt, empty file) are dropped with its reason."""

    name = "read"

    def __call__(self, doc: Doc) -> Optional[Drop]:
        r = doc.record
        return Drop(f"read.{r.error}", detail=r.error_detail) if r.error else KEEP


class UrlLists:
    """Drops documents whose URL is on the blocklist, then those on the opt-out list."""

    name = "urls"

    def __init__(self, spec: UrlSpec):
        self.block, self.optout = build_lists(spec)

    def __call__(self, doc: Doc) -> Optional[Drop]:
        if hit := self.block.match(doc.record.url):
            return Drop("urls.blocklist", detail=hit)
        if hit := self.optout.match(doc.record.url):
            return Drop("urls.optout", detail=hit)
        return KEEP


class Extract:
    """Sets ``doc.text``: the record's text, or its HTML decoded and (when enabled) reduced to the main text."""

    name = "extract"

    def __init__(self, spec: ExtractSpec):
        self.spec = spec
        with _reported(Engine.resiliparse, "filter.extract (charset detection)"):
            from resiliparse.parse.encoding import detect_encoding  # noqa: F401  decode_html's, checked now
        self.to_text = None
        if spec.enabled:
            with _reported(spec.engine, f"filter.extract.engine={spec.engine}"):
                self.to_text = html_to_text(spec)
        self.min_chars = max(spec.min_chars, 1)

    def __call__(self, doc: Doc) -> Optional[Drop]:
        record = doc.record
        if record.text is not None:
            doc.text = record.text
        else:
            if record.content_type not in TEXT_TYPES:
                return Drop("extract.content_type", detail=record.content_type or "")
            try:
                html, _ = decode_html(record.html, record.charset, self.spec.max_invalid_char_fraction)
            except UndecodableError as e:
                return Drop("extract.undecodable", detail=str(e))
            if self.to_text is None:
                doc.text = html
            else:
                try:
                    doc.text = self.to_text(html)
                except Exception as e:  # an extractor's crash on one page must not stop the corpus
                    return Drop("extract.error", detail=f"{type(e).__name__}: {e}")
        chars = len(doc.text.strip())
        if chars < self.min_chars:
            return Drop("extract.no_text", value=chars, limit=self.min_chars)
        return KEEP


class LanguageId:
    """Sets ``doc.lang`` and ``doc.lang_score``; drops other languages and unsure answers."""

    name = "langid"

    def __init__(self, spec: LangIdSpec):
        self.spec = spec
        with _reported("py3langid", "filter.langid"):
            known = set(known_languages())  # loads the bundled model once, before any worker forks
        unknown = [lang for lang in spec.languages if lang not in known]
        if unknown:
            raise PipelineError(f"config key 'filter.langid.languages' has {', '.join(map(repr, unknown))}, which "
                                f"py3langid does not know; use ISO 639-1 codes such as en, de, fr")
        self.languages = set(spec.languages)

    def __call__(self, doc: Doc) -> Optional[Drop]:
        doc.lang, doc.lang_score = identify(doc.text, self.spec.max_chars)
        if self.languages and doc.lang not in self.languages:
            return Drop("langid.language", value=doc.lang_score, detail=doc.lang)
        if doc.lang_score < self.spec.min_score:
            return Drop("langid.min_score", value=doc.lang_score, limit=self.spec.min_score, detail=doc.lang)
        return KEEP


class Score:
    """Measures every quality rule's value (``doc.metrics``), C4's kept lines and the toxic words; never drops.

    Gopher judges the page as extracted; C4 removes lines and judges what is left, which is also the
    text the toxic words are counted in and the one a kept document is written with.
    """

    name = "score"

    def __init__(self, gopher: Optional[GopherSpec], c4: Optional[C4Spec], toxic_words: List[str],
                 languages: Sequence[str] = ()):
        self.gopher, self.c4, self.toxic_words = gopher, c4, toxic_words
        self.bad_words = BadWords(c4.bad_words, preload=languages) if c4 and c4.bad_words else None

    def metric_names(self) -> List[str]:
        return list(document_metrics("a b", "en", self.gopher, self.c4, self.bad_words)[0])

    def __call__(self, doc: Doc) -> Optional[Drop]:
        doc.scored = True
        doc.metrics, page = document_metrics(doc.text, doc.lang, self.gopher, self.c4, self.bad_words)
        doc.c4_lines = None if page is None else page.kept
        if self.toxic_words:
            kept = doc.text if page is None else page.text
            doc.toxic_words = count_listed(normalise_words(kept), kept.lower(), self.toxic_words)
        return KEEP


class Thresholds:
    """Gopher's rules, then C4's, then the toxicity flag, judged on the scores; the first rule broken drops.

    The rule names say which set (gopher.*, c4.*, toxicity.*), and so does the funnel. A rejected document
    keeps all its measurements whichever rule removed it.
    """

    name = "thresholds"

    def __init__(self, gopher: Optional[GopherSpec], c4: Optional[C4Spec], toxicity: ToxicitySpec,
                 bad_words: Optional[BadWords], toxic_words: List[str]):
        self.rules = rules(gopher, c4)
        self.toxicity = toxicity if toxic_words else None
        self.bad_words, self.toxic_words = bad_words, toxic_words

    def __call__(self, doc: Doc) -> Optional[Drop]:
        failed = first_failure(doc.metrics, self.rules)
        if failed is not None:
            detail = ", ".join(_commonest(self.bad_words.find(doc.kept_text, doc.lang) or [])) \
                if failed.name == "c4.bad_words" else ""
            return Drop(failed.name, value=doc.metrics[failed.metric], limit=failed.limit, detail=detail)
        if self.toxicity is not None:
            doc.toxic = doc.toxic_words >= self.toxicity.min_hits
            if self.toxicity.reject and doc.toxic:
                return Drop("toxicity.words", value=doc.toxic_words, limit=self.toxicity.min_hits,
                            detail=which_words(doc.kept_text, self.toxic_words))
        return KEEP


class RedactPii:
    """Replaces e-mail addresses, IP addresses and phone numbers in ``doc.text``; never drops."""

    name = "pii"

    def __init__(self, spec: PiiSpec):
        self.spec = spec

    def __call__(self, doc: Doc) -> Optional[Drop]:
        doc.redacted, doc.pii = redact(doc.kept_text, self.spec)
        return KEEP


def build_steps(spec: StepsSpec) -> List[Step]:
    """The enabled steps in the order they run. Word lists are read and optional packages imported here."""
    steps: List[Step] = [ReadErrors()]
    if spec.urls.enabled:
        steps.append(UrlLists(spec.urls))
    steps.append(Extract(spec.extract))  # always: the later steps need text (enabled: false keeps the HTML)
    if spec.langid.enabled:
        steps.append(LanguageId(spec.langid))
    steps += after_scoring_steps(spec, score=True)
    return steps


def after_scoring_steps(spec: StepsSpec, score: bool = False) -> List[Step]:
    """The steps that judge stored scores: thresholds and pii (with ``score``, the score step before them)."""
    gopher = spec.gopher if spec.gopher.enabled else None
    c4 = spec.c4 if spec.c4.enabled else None
    toxic = load_word_list(spec.toxicity.words_file) if spec.toxicity.enabled and spec.toxicity.words_file else []
    scorer = Score(gopher, c4, toxic, spec.langid.languages if spec.langid.enabled else ())
    steps: List[Step] = [scorer] if score else []
    steps.append(Thresholds(gopher, c4, spec.toxicity, scorer.bad_words, toxic))
    if spec.pii.enabled:
        steps.append(RedactPii(spec.pii))  # last: only kept documents are redacted
    return steps


def first_drop(steps: List[Step], doc: Doc) -> Optional[Drop]:
    """Run ``doc`` through ``steps`` in order; the first drop ends its way (None: kept)."""
    for step in steps:
        drop = step(doc)
        if drop is not None:
            return drop
    return KEEP


def metric_names(steps: List[Step]) -> List[str]:
    """The names in ``Doc.metrics``; at least "words", so the Parquet struct of metrics is never empty."""
    return next(s for s in steps if isinstance(s, Score)).metric_names()


def which_words(text: str, listed: List[str]) -> str:
    """The listed words and phrases found in ``text``, commonest first: "spam (3), scam (1)"."""
    hits = listed_hits(normalise_words(text), text.lower(), listed)
    return ", ".join(f"{w} ({n})" for w, n in hits.most_common(10))


def _commonest(found: List[str]) -> List[str]:
    return [f"{w} ({n})" for w, n in Counter(found).most_common(10)]


@contextmanager
def _reported(package: str, needed_by: str) -> Iterator[None]:
    """Turns an ImportError while a step is built into one line naming the package and how to install it."""
    try:
        yield
    except ImportError as e:
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PipelineError(f"{needed_by} needs the package {package}, which cannot be imported ({cause}): "
                            f"pip install {PIP.get(package, package)}") from None
