"""Document quality rules in the spirit of Gopher (MassiveText) and C4, as metrics plus thresholds.

``document_metrics`` measures a text once; ``first_failure`` walks the enabled rules in a fixed
order and returns the first one the metrics break, so every rejection names one rule and one value.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from pipeline.errors import BadInput, check

# Gopher's stop-word rule asks for a few of the commonest function words of the language.
STOP_WORDS = {
    "en": {"the", "be", "to", "of", "and", "that", "have", "with"},
    "de": {"der", "die", "das", "und", "zu", "mit", "nicht", "sich"},
    "fr": {"le", "la", "les", "et", "de", "des", "que", "avec"},
    "es": {"el", "la", "los", "de", "que", "y", "con", "para"},
}
BULLETS = ("•", "●", "○", "■", "□", "▪", "‣", "◦", "·", "-", "*", "–", "—", "➢", "►", "✓")
ELLIPSES = ("...", "…")
TERMINAL = (".", "!", "?", '"', "'", "”", "’", "»", "。", "！", "？")
SENTENCE_END = re.compile(r"[.!?。！？]+(?=[\s\"'”’»)]|$)")
PUNCT = "\"'“”‘’«»()[]{}<>.,;:!?¡¿…-–—*#/\\|"


@dataclass
class GopherSpec:
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and ellipses per word
    max_bullet_line_fraction: float = 0.9  # lines starting with a bullet
    max_ellipsis_line_fraction: float = 0.3  # lines ending with an ellipsis
    min_alpha_word_fraction: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # occurrences of the language's stop words (languages in STOP_WORDS only)
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_paragraph_fraction: float = 0.3
    max_duplicate_line_char_fraction: float = 0.2
    max_duplicate_paragraph_char_fraction: float = 0.2
    # n -> the most frequent word n-gram may cover at most this share of the characters
    max_top_ngram_char_fraction: Dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # n -> word n-grams that occur more than once may cover at most this share of the characters
    max_duplicate_ngram_char_fraction: Dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

    def __post_init__(self):
        for key in ("min_words", "min_mean_word_length", "max_symbol_word_ratio", "min_stop_words"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "at least 0")
        check(self.max_words >= self.min_words, "max_words", self.max_words, f"at least min_words ({self.min_words})")
        check(self.max_mean_word_length >= self.min_mean_word_length, "max_mean_word_length",
              self.max_mean_word_length, f"at least min_mean_word_length ({self.min_mean_word_length})")
        for key in ("max_bullet_line_fraction", "max_ellipsis_line_fraction", "min_alpha_word_fraction",
                    "max_duplicate_line_fraction", "max_duplicate_paragraph_fraction",
                    "max_duplicate_line_char_fraction", "max_duplicate_paragraph_char_fraction"):
            check(0 <= getattr(self, key) <= 1, key, getattr(self, key), "in [0, 1]")
        for key in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
            for n, limit in getattr(self, key).items():
                check(int(n) >= 1, f"{key}.{n}", n, "an n-gram length of at least 1")
                check(0 <= limit <= 1, f"{key}.{n}", limit, "in [0, 1]")


@dataclass
class C4Spec:
    enabled: bool = True
    max_no_terminal_punct_line_fraction: float = 0.88  # lines not ending in . ! ? or a closing quote
    min_sentences: int = 3
    reject_lorem_ipsum: bool = True
    reject_curly_braces: bool = True  # '{' is the mark of code or templates left in the text
    bad_words_file: Optional[str] = None  # one word or phrase per line; None: no bad-word rule
    max_bad_words: int = 0  # more occurrences than this: rejected

    def __post_init__(self):
        check(0 <= self.max_no_terminal_punct_line_fraction <= 1, "max_no_terminal_punct_line_fraction",
              self.max_no_terminal_punct_line_fraction, "in [0, 1]")
        check(self.min_sentences >= 0, "min_sentences", self.min_sentences, "at least 0")
        check(self.max_bad_words >= 0, "max_bad_words", self.max_bad_words, "at least 0")


@dataclass
class Rule:
    name: str  # e.g. gopher.min_words
    metric: str  # the key in the metrics dict
    kind: str  # "min" (value must be >= limit) or "max" (value must be <= limit)
    limit: float

    def fails(self, value: Optional[float]) -> bool:
        if value is None:  # not measurable for this document (e.g. stop words of an unlisted language)
            return False
        return value < self.limit if self.kind == "min" else value > self.limit


def load_word_list(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [w.strip().lower() for w in fh if w.strip() and not w.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"word list {path} cannot be read: {e}") from None


def normalise_words(text: str) -> List[str]:
    return [w.strip(PUNCT).lower() for w in text.split()]


def listed_hits(words: List[str], text_lower: str, listed: List[str]) -> Counter:
    """Occurrences of each listed single word among ``words`` and of each listed phrase in the text."""
    singles = {w for w in listed if " " not in w}
    hits = Counter(w for w in words if w in singles)
    hits.update({p: text_lower.count(p) for p in listed if " " in p and p in text_lower})
    return hits


def count_listed(words: List[str], text_lower: str, listed: List[str]) -> int:
    return sum(listed_hits(words, text_lower, listed).values())


def _duplicates(items: List[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of their characters)."""
    if not items:
        return 0.0, 0.0
    seen, dup, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dup += 1
            dup_chars += len(item)
        seen.add(item)
    return dup / len(items), dup_chars / max(sum(map(len, items)), 1)


def _top_ngram_fraction(words: List[str], n: int, total_chars: int) -> float:
    if len(words) < n:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    return count * sum(map(len, gram)) / total_chars if count > 1 else 0.0


def _duplicate_ngram_fraction(words: List[str], n: int, total_chars: int) -> float:
    if len(words) < n:
        return 0.0
    seen: set = set()
    covered = bytearray(len(words))
    for i, gram in enumerate(zip(*(words[j:] for j in range(n)))):
        if gram in seen:
            covered[i:i + n] = b"\x01" * n
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def document_metrics(text: str, lang: Optional[str], gopher: Optional[GopherSpec], c4: Optional[C4Spec],
                     bad_words: List[str] = ()) -> Dict[str, Optional[float]]:
    words = text.split()
    n_words = len(words)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    m: Dict[str, Optional[float]] = {"words": n_words}
    if gopher is not None:
        word_chars = sum(map(len, words))
        m["mean_word_length"] = word_chars / n_words if n_words else 0.0
        symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
        m["symbol_word_ratio"] = symbols / n_words if n_words else 0.0
        m["bullet_line_fraction"] = sum(1 for l in lines if l.startswith(BULLETS)) / len(lines) if lines else 0.0
        m["ellipsis_line_fraction"] = sum(1 for l in lines if l.endswith(ELLIPSES)) / len(lines) if lines else 0.0
        m["alpha_word_fraction"] = sum(1 for w in words if any(c.isalpha() for c in w)) / n_words if n_words else 0.0
        stops = STOP_WORDS.get(lang or "")
        m["stop_words"] = None if stops is None else sum(1 for w in normalise_words(text) if w in stops)
        m["duplicate_line_fraction"], m["duplicate_line_char_fraction"] = _duplicates(lines)
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        m["duplicate_paragraph_fraction"], m["duplicate_paragraph_char_fraction"] = _duplicates(paragraphs)
        total = max(word_chars, 1)
        for n in gopher.max_top_ngram_char_fraction:
            m[f"top_{n}gram_char_fraction"] = _top_ngram_fraction(words, int(n), total)
        for n in gopher.max_duplicate_ngram_char_fraction:
            m[f"duplicate_{n}gram_char_fraction"] = _duplicate_ngram_fraction(words, int(n), total)
    if c4 is not None:
        lower = text.lower()
        m["no_terminal_punct_line_fraction"] = (sum(1 for l in lines if not l.endswith(TERMINAL)) / len(lines)
                                                if lines else 1.0)
        m["sentences"] = len(SENTENCE_END.findall(text))
        m["lorem_ipsum"] = float("lorem ipsum" in lower)
        m["curly_braces"] = float("{" in text)
        m["bad_words"] = count_listed(normalise_words(text), lower, list(bad_words)) if bad_words else 0
    return m


def rules(gopher: Optional[GopherSpec], c4: Optional[C4Spec]) -> List[Rule]:
    """The enabled rules, in the order they are checked."""
    out: List[Rule] = []
    if gopher is not None:
        g = gopher
        out += [Rule("gopher.min_words", "words", "min", g.min_words),
                Rule("gopher.max_words", "words", "max", g.max_words),
                Rule("gopher.min_mean_word_length", "mean_word_length", "min", g.min_mean_word_length),
                Rule("gopher.max_mean_word_length", "mean_word_length", "max", g.max_mean_word_length),
                Rule("gopher.max_symbol_word_ratio", "symbol_word_ratio", "max", g.max_symbol_word_ratio),
                Rule("gopher.max_bullet_line_fraction", "bullet_line_fraction", "max", g.max_bullet_line_fraction),
                Rule("gopher.max_ellipsis_line_fraction", "ellipsis_line_fraction", "max",
                     g.max_ellipsis_line_fraction),
                Rule("gopher.min_alpha_word_fraction", "alpha_word_fraction", "min", g.min_alpha_word_fraction),
                Rule("gopher.min_stop_words", "stop_words", "min", g.min_stop_words),
                Rule("gopher.max_duplicate_line_fraction", "duplicate_line_fraction", "max",
                     g.max_duplicate_line_fraction),
                Rule("gopher.max_duplicate_paragraph_fraction", "duplicate_paragraph_fraction", "max",
                     g.max_duplicate_paragraph_fraction),
                Rule("gopher.max_duplicate_line_char_fraction", "duplicate_line_char_fraction", "max",
                     g.max_duplicate_line_char_fraction),
                Rule("gopher.max_duplicate_paragraph_char_fraction", "duplicate_paragraph_char_fraction", "max",
                     g.max_duplicate_paragraph_char_fraction)]
        out += [Rule(f"gopher.max_top_{n}gram_char_fraction", f"top_{n}gram_char_fraction", "max", v)
                for n, v in g.max_top_ngram_char_fraction.items()]
        out += [Rule(f"gopher.max_duplicate_{n}gram_char_fraction", f"duplicate_{n}gram_char_fraction", "max", v)
                for n, v in g.max_duplicate_ngram_char_fraction.items()]
    if c4 is not None:
        out += [Rule("c4.max_no_terminal_punct_line_fraction", "no_terminal_punct_line_fraction", "max",
                     c4.max_no_terminal_punct_line_fraction),
                Rule("c4.min_sentences", "sentences", "min", c4.min_sentences)]
        if c4.reject_lorem_ipsum:
            out.append(Rule("c4.lorem_ipsum", "lorem_ipsum", "max", 0))
        if c4.reject_curly_braces:
            out.append(Rule("c4.curly_braces", "curly_braces", "max", 0))
        if c4.bad_words_file:
            out.append(Rule("c4.bad_words", "bad_words", "max", c4.max_bad_words))
    return out


def first_failure(metrics: Dict[str, Optional[float]], checked: List[Rule]) -> Optional[Rule]:
    return next((r for r in checked if r.fails(metrics.get(r.metric))), None)
