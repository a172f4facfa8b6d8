"""HTML bytes to main text: charset handling, then a main-content extractor (resiliparse or trafilatura)."""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Optional

ENGINES = ("resiliparse", "trafilatura")
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain", None)


@dataclass
class ExtractSpec:
    enabled: bool = True
    engine: str = "resiliparse"  # resiliparse (fast, C++) | trafilatura (slower, often cleaner)
    main_content: bool = True  # drop navigation, headers, footers and other boilerplate
    min_chars: int = 1  # fewer extracted characters: rejected as no_text
    max_invalid_char_fraction: float = 0.01  # bytes no charset decodes, replaced by U+FFFD up to this share


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


def extract_text(html: str, spec: ExtractSpec) -> str:
    if spec.engine == "trafilatura":
        import trafilatura

        return trafilatura.extract(html, include_comments=not spec.main_content, include_tables=True,
                                   favor_recall=not spec.main_content) or ""
    from resiliparse.extract.html2text import extract_plain_text

    text = extract_plain_text(html, main_content=spec.main_content, alt_texts=False, links=False, list_bullets=True)
    if not text.strip() and spec.main_content:
        # resiliparse's main-content heuristics find nothing on some layouts; the whole page's
        # text then goes on to the quality rules, which judge its boilerplate.
        text = extract_plain_text(html, main_content=False, alt_texts=False, links=False, list_bullets=True)
    return text
