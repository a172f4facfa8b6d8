"""HTML bytes to main text: charset handling, then a main-content extractor (resiliparse or trafilatura)."""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Optional

from pipeline.errors import check, choice

TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain", None)


class Engine(StrEnum):
    resiliparse = "resiliparse"
    trafilatura = "trafilatura"


# What to install when an engine cannot be imported (trafilatura needs lxml_html_clean with lxml >= 5.2).
PIP = {Engine.resiliparse: "resiliparse", Engine.trafilatura: "trafilatura lxml_html_clean"}


@dataclass
class ExtractSpec:
    enabled: bool = True  # false: keep the decoded HTML as it is
    engine: Engine = Engine.resiliparse  # resiliparse (fast, C++) | trafilatura (slower, often cleaner)
    main_content: bool = True  # drop navigation, headers, footers and other boilerplate
    min_chars: int = 1  # fewer extracted characters: rejected as no_text
    max_invalid_char_fraction: float = 0.01  # bytes no charset decodes, replaced by U+FFFD up to this share

    def __post_init__(self):
        self.engine = choice(Engine, self.engine, "engine")
        check(self.min_chars >= 0, "min_chars", self.min_chars, "at least 0")
        check(0 <= self.max_invalid_char_fraction <= 1, "max_invalid_char_fraction", self.max_invalid_char_fraction,
              "in [0, 1]")


class UndecodableError(ValueError):
    pass


def decode_html(raw: bytes, declared: Optional[str], max_invalid_fraction: float = 0.0) -> tuple[str, str]:
    """Decode page bytes: the declared charset if the bytes fit it, else the detected one.

    Returns (text, charset used). A page whose declared charset is wrong (mislabelled) is decoded
    with the detected one. Bytes that fit no candidate are replaced by U+FFFD when they are at most
    ``max_invalid_fraction`` of the characters (a few stray bytes in a real page); more raise
    ``UndecodableError``.
    """
    from resiliparse.parse.encoding import detect_encoding

    candidates = []
    if declared:
        try:
            candidates.append(codecs.lookup(declared).name)
        except LookupError:
            pass
    candidates += [detect_encoding(raw), "utf-8"]
    candidates = list(dict.fromkeys(candidates))
    for charset in candidates:
        try:
            return raw.decode(charset), charset
        except (UnicodeDecodeError, LookupError):
            continue
    best = candidates[0]
    text = raw.decode(best, errors="replace")
    invalid = text.count("\ufffd") / max(len(text), 1)
    if invalid <= max_invalid_fraction:
        return text, best
    raise UndecodableError(f"{invalid:.1%} of the characters fit none of {', '.join(candidates)}")


def html_to_text(spec: ExtractSpec) -> Callable[[str], str]:
    """The engine's HTML-to-main-text function. Its package is imported here, once, so a missing or
    broken install raises ImportError now rather than failing on every page."""
    if spec.engine == Engine.trafilatura:
        import trafilatura

        def with_trafilatura(html: str) -> str:
            return trafilatura.extract(html, include_comments=not spec.main_content, include_tables=True,
                                       favor_recall=not spec.main_content) or ""
        return with_trafilatura

    from resiliparse.extract.html2text import extract_plain_text

    def with_resiliparse(html: str) -> str:
        text = extract_plain_text(html, main_content=spec.main_content, alt_texts=False, links=False,
                                  list_bullets=True)
        if not text.strip() and spec.main_content:
            # resiliparse's main-content heuristics find nothing on some layouts; the whole page's
            # text then goes on to the quality rules, which judge its boilerplate.
            text = extract_plain_text(html, main_content=False, alt_texts=False, links=False, list_bullets=True)
        return text
    return with_resiliparse
