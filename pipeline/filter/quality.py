"""Document quality rules as published: Gopher's (Rae et al. 2021) and C4's (Raffel et al. 2020).

Scores first, thresholds later. ``document_metrics`` measures a text once: every Gopher value, and
C4's line removal followed by its page-level values on the lines that are left. ``rules`` turns the
thresholds into an ordered list and ``first_failure`` returns the first rule the measurements break,
so every rejection names one rule and one value. The measurements do not depend on any threshold, so
stored scores can be judged again under other thresholds without reading the pages again.

**Gopher** (MassiveText quality filter, appendix A of the paper; 7 "quality" rules and 13
"repetition" rules, thresholds from the paper). The paper names the measurements but not every
definition; where it is silent, this module's choice is stated and is the same for every rule:

- a *word* is a whitespace-separated token with the punctuation and symbols at both of its ends
  removed; a token made only of punctuation or symbols ("-", "•", "…", "#") is not a word;
- a *line* is a piece of the text between newlines, stripped; empty lines are not lines;
- a *paragraph* is a piece of the text between blank lines, stripped;
- a *duplicate* line (paragraph, n-gram) is an occurrence of one that already occurred earlier in the
  document: the first occurrence is not a duplicate, so a text said twice is half duplicate;
- character fractions are over the characters of the items measured: lines over the characters of
  all lines, paragraphs over all paragraphs, n-grams over the characters of all words.

**C4** (section 2.2 of the paper, and ``clean_page`` in TensorFlow Datasets' ``c4_utils``, which
built the released corpus). Lines are removed first, in the reference implementation's order:
a line with a word longer than 1,000 characters; then, after citation markers ("[1]", "[edit]",
"[citation needed]") are cut out of it, a line that does not end in ``.``, ``?``, ``!`` or ``"``
(or ends in "..."); a line of fewer than 5 words; a line that mentions "javascript"; a line with
a cookie or privacy-policy phrase. The page is then discarded if a line that got past the
end-mark and length checks says "lorem ipsum", if one that also is not a javascript line holds a
curly brace, if the kept lines hold fewer than 3 sentences, or if the kept text holds a term of
the bad-words list. The kept text is the kept lines, stripped, joined by newlines.

The paper's prose says lines of at least 3 words and pages of at least 5 sentences; the
implementation that built the corpus used 5 words per line and 3 sentences per page, and that is
what ``C4Spec`` defaults to. Deviations: sentences are counted with a regular expression (sentence
ends followed by a space or the end of the line, at least one per kept line) instead of NLTK's
Punkt model, which would have to be downloaded; bad words are matched on the whole kept text, per
the document's language, as whole words or phrases (the multilingual mC4 code's matching), not line
by line with the 2019 English build's ``[^a-z]`` boundaries, which missed a term at a line's start
or end; a document without an identified language (langid off) is judged with the English list, as
C4's English corpus was. A page with both "lorem ipsum" and a curly brace is named ``c4.lorem_ipsum``
where ``clean_page`` named whichever line came first (the verdict is the same). Empty lines are
dropped without being counted.
"""
from __future__ import annotations

import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from pipeline.errors import BadInput, check

# Gopher's stop-word rule: a document must hold at least two of these eight English words. The lists for
# de, fr and es are this project's extension (the paper filters English); other languages skip the rule.
STOP_WORDS = {
    "en": {"the", "be", "to", "of", "and", "that", "have", "with"},
    "de": {"der", "die", "das", "und", "zu", "mit", "nicht", "sich"},
    "fr": {"le", "la", "les", "et", "de", "des", "que", "avec"},
    "es": {"el", "la", "los", "de", "que", "y", "con", "para"},
}
BULLETS = ("•", "●", "○", "■", "□", "▪", "‣", "◦", "·", "-", "*", "–", "—", "➢", "►", "✓")
ELLIPSES = ("...", "…")
# Stripped from both ends of a token to make a word: ASCII punctuation, typographic quotes and dashes, bullets.
PUNCT = string.punctuation + "“”‘’«»‹›„‚¡¿…–—―•●○■□▪‣◦·➢►✓©®™°§¶"

# C4, as in c4_utils
C4_END_MARKS = (".", "?", "!", '"')
C4_ELLIPSIS = "..."
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
C4_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
SENTENCE_END = re.compile(r"[.!?。！？]+[\"'”’»)\]]*(?=\s|$)")
# Why C4 removes a line, in the order the checks run; a line is counted under the first it fails.
C4_LINE_RULES = ("too_long_word", "no_end_mark", "too_short", "javascript", "policy")
# Languages written without spaces between words: a bad word counts wherever it occurs (as in mC4).
UNSPACED = {"ja", "th", "zh"}


@dataclass
class GopherSpec:
    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_hash_word_ratio: float = 0.1  # '#' per word
    max_ellipsis_word_ratio: float = 0.1  # '...' and '…' per word
    max_bullet_line_fraction: float = 0.9  # lines starting with a bullet
    max_ellipsis_line_fraction: float = 0.3  # lines ending with an ellipsis
    min_alpha_word_fraction: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # distinct stop words of the language present (languages in STOP_WORDS only)
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_paragraph_fraction: float = 0.3
    max_duplicate_line_char_fraction: float = 0.2
    max_duplicate_paragraph_char_fraction: float = 0.2
    # n -> all occurrences of the most frequent word n-gram (if it occurs twice or more) may cover at most
    # this share of the word characters
    max_top_ngram_char_fraction: Dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # n -> the words covered by duplicate n-grams (repeats of an earlier n-gram; overlaps counted once) may
    # hold at most this share of the word characters
    max_duplicate_ngram_char_fraction: Dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

    def __post_init__(self):
        for key in ("min_words", "min_mean_word_length", "max_hash_word_ratio", "max_ellipsis_word_ratio",
                    "min_stop_words"):
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
    # line removal (changing these changes the kept text, so the pages are scored again)
    min_words_per_line: int = 5  # c4_utils' default; the paper's prose says 3
    max_word_length: int = 1000  # a line with a longer word is removed
    # page rules (thresholds: a change is re-applied to stored scores)
    min_sentences: int = 3  # in the kept lines; c4_utils' default, the paper's prose says 5
    reject_lorem_ipsum: bool = True
    reject_curly_braces: bool = True  # '{' in a line C4 would otherwise keep: code or templates
    # bad words: a directory with one list per language code (the LDNOOBW layout: <dir>/en, <dir>/de, ...),
    # one word or phrase per line; documents in a language with no list are not judged; None: no bad-word rule
    bad_words: Optional[str] = None
    max_bad_words: int = 0  # more occurrences than this: rejected

    def __post_init__(self):
        check(self.min_words_per_line >= 0, "min_words_per_line", self.min_words_per_line, "at least 0")
        check(self.max_word_length >= 1, "max_word_length", self.max_word_length, "at least 1")
        check(self.min_sentences >= 0, "min_sentences", self.min_sentences, "at least 0")
        check(self.max_bad_words >= 0, "max_bad_words", self.max_bad_words, "at least 0")


# The keys that only compare a stored measurement with a limit: changing them needs no new scores. The sizes
# of Gopher's n-gram rules (their dicts' keys) decide what is measured; only the limits are thresholds.
THRESHOLD_KEYS = {
    "gopher": {f for f in GopherSpec.__dataclass_fields__ if f != "enabled"},
    "c4": {"min_sentences", "reject_lorem_ipsum", "reject_curly_braces", "max_bad_words"},
}
UNKNOWN_LANGUAGE = "en"  # the bad-word list for documents without an identified language (langid off), as C4/en


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


def _trie_pattern(terms: Sequence[str]) -> str:
    """One regular expression for many literal terms, as a character trie: each position is tried once
    against the first characters, instead of once per term (a plain alternation of 400 terms is 5x slower)."""
    trie: dict = {}
    for term in terms:
        node = trie
        for ch in term:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body
    return build(trie)


def bad_word_lists(directory: str) -> Dict[str, str]:
    """Language code -> list file in a bad-words directory: files named by a lower-case code (en, fil), so
    LICENSE, regional variants (fr-CA-u-sd-caqc) and a clone's .git are left out."""
    if not os.path.isdir(directory):
        return {}
    return {name: os.path.join(directory, name) for name in sorted(os.listdir(directory))
            if name.islower() and name.isalpha() and os.path.isfile(os.path.join(directory, name))}


class BadWords:
    """Bad-word lists by language; ``find`` returns the terms found in a text, as whole words or phrases.

    The lists are read at once (a missing directory fails before any work); each language's pattern is
    compiled the first time a document in that language is judged.
    """

    def __init__(self, directory: str, preload: Sequence[str] = ()):
        if not os.path.isdir(directory):
            raise BadInput(f"config key 'filter.c4.bad_words': {directory} is not a directory of word lists "
                           f"(one file per language code, e.g. en, de)")
        self.terms = {lang: [t for t in load_word_list(path) if t] for lang, path in bad_word_lists(directory).items()}
        if not any(self.terms.values()):
            raise BadInput(f"config key 'filter.c4.bad_words': {directory} holds no word lists")
        self.patterns: Dict[str, Optional[re.Pattern]] = {}
        for lang in preload:  # compiled once here, before worker processes fork, not once in each
            self._pattern(lang)

    def _pattern(self, lang: str) -> Optional[re.Pattern]:
        if lang not in self.patterns:
            terms = self.terms.get(lang)
            body = _trie_pattern(terms) if terms else None
            self.patterns[lang] = None if body is None else re.compile(
                body if lang in UNSPACED else rf"(?<!\w){body}(?!\w)")
        return self.patterns[lang]

    def find(self, text: str, lang: Optional[str]) -> Optional[List[str]]:
        """The terms found, in order (None: no list for ``lang``; no language at all: the English list)."""
        pattern = self._pattern((lang or UNKNOWN_LANGUAGE).split("-")[0])
        return None if pattern is None else pattern.findall(text.lower())


def _words(text: str) -> List[str]:
    return [w for w in (t.strip(PUNCT) for t in text.split()) if w]


def _duplicates(items: List[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of the items' characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen, dup, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dup += 1
            dup_chars += len(item)
        seen.add(item)
    return dup / len(items), dup_chars / max(sum(map(len, items)), 1)


def _ngram_fractions(words: List[str], top: Sequence[int],
                     duplicate: Sequence[int]) -> tuple[Dict[int, float], Dict[int, float]]:
    """({n: the top n-gram's character fraction} for n in ``top``, {n: the duplicate n-grams'} for n in ``duplicate``).

    Top: every occurrence of the most frequent n-gram (of those tied, the longest) over the characters
    of all words; 0 when no n-gram occurs twice. Duplicate: the characters of the words covered by a
    repeat of an earlier n-gram, each word once however many repeats overlap it.

    N-grams are numbered class by class: the n-gram at i is the (n-1)-gram at i followed by word i+n-1,
    so one integer sort per n finds equal n-grams exactly (on the demo pages 0.7 s instead of 3 s for
    hashing word tuples).
    """
    top_out, dup_out = {n: 0.0 for n in top}, {n: 0.0 for n in duplicate}
    count = len(words)
    total = max(sum(map(len, words)), 1)
    index: Dict[str, int] = {}
    ids = np.fromiter((index.setdefault(w, len(index)) for w in words), dtype=np.int64, count=count)
    ends = np.concatenate(([0], np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=count))))
    lengths = np.diff(ends)
    classes = ids
    for n in range(1, max((*top, *duplicate), default=0) + 1):
        if count < n:
            break
        keys = ids if n == 1 else classes[:-1] * count + ids[n - 1:]
        _, first, classes = np.unique(keys, return_index=True, return_inverse=True)
        if n in top:
            counts = np.bincount(classes)
            most = int(counts.max())
            if most >= 2:
                chars = int((ends[n:] - ends[:-n])[counts[classes] == most].max())
                top_out[n] = min(most * chars / total, 1.0)
        if n in duplicate:
            repeats = np.nonzero(first[classes] != np.arange(len(classes)))[0]
            if len(repeats):
                covered = np.zeros(count + 1, dtype=np.int64)
                np.add.at(covered, repeats, 1)
                np.add.at(covered, repeats + n, -1)
                dup_out[n] = int(lengths[np.cumsum(covered[:-1]) > 0].sum()) / total
    return top_out, dup_out


def gopher_metrics(text: str, lang: Optional[str], spec: GopherSpec) -> Dict[str, Optional[float]]:
    words = _words(text)
    n = len(words)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    word_chars = sum(map(len, words))
    stops = STOP_WORDS.get(lang or "")
    m: Dict[str, Optional[float]] = {
        "words": n,
        "mean_word_length": word_chars / n if n else 0.0,
        "hash_word_ratio": text.count("#") / n if n else 0.0,
        "ellipsis_word_ratio": (text.count("...") + text.count("…")) / n if n else 0.0,
        "bullet_line_fraction": sum(1 for l in lines if l.startswith(BULLETS)) / len(lines) if lines else 0.0,
        "ellipsis_line_fraction": sum(1 for l in lines if l.endswith(ELLIPSES)) / len(lines) if lines else 0.0,
        "alpha_word_fraction": sum(1 for w in words if any(c.isalpha() for c in w)) / n if n else 0.0,
        "stop_words": None if stops is None else len(stops.intersection(w.lower() for w in words)),
    }
    m["duplicate_line_fraction"], m["duplicate_line_char_fraction"] = _duplicates(lines)
    m["duplicate_paragraph_fraction"], m["duplicate_paragraph_char_fraction"] = _duplicates(paragraphs)
    top, duplicate = _ngram_fractions(words, [int(k) for k in spec.max_top_ngram_char_fraction],
                                      [int(k) for k in spec.max_duplicate_ngram_char_fraction])
    for k in spec.max_top_ngram_char_fraction:
        m[f"top_{k}gram_char_fraction"] = top[int(k)]
    for k in spec.max_duplicate_ngram_char_fraction:
        m[f"duplicate_{k}gram_char_fraction"] = duplicate[int(k)]
    return m


def _c4_line(line: str) -> str:
    """A line as C4 keeps it: stripped, citation markers cut out."""
    line = line.strip()
    return C4_CITATION.sub("", line) if "[" in line else line


@dataclass
class C4Page:
    """C4's line removal on one page: the lines kept, why the others went, and the page-level values."""

    kept: List[int]  # indices (in text.splitlines()) of the lines kept
    removed: Dict[str, int]  # line rule -> lines removed (empty lines are dropped without being counted)
    lorem_ipsum: bool  # in a line that got past the end-mark and length checks
    curly_braces: bool  # '{' in such a line that is not a javascript line
    sentences: int  # in the kept lines
    text: str  # the kept lines joined


def c4_page(text: str, spec: C4Spec) -> C4Page:
    kept, out, removed = [], [], Counter()
    lorem = curly = False
    sentences = 0
    for i, raw in enumerate(text.splitlines()):
        stripped = raw.strip()
        if not stripped:
            continue
        if any(len(w) > spec.max_word_length for w in stripped.split()):
            removed["too_long_word"] += 1
            continue
        line = _c4_line(stripped)
        if not line.endswith(C4_END_MARKS) or line.endswith(C4_ELLIPSIS):
            removed["no_end_mark"] += 1
            continue
        if len(line.split()) < spec.min_words_per_line:
            removed["too_short"] += 1
            continue
        lower = line.lower()
        lorem = lorem or "lorem ipsum" in lower
        if "javascript" in lower:
            removed["javascript"] += 1
            continue
        curly = curly or "{" in line
        if any(p in lower for p in C4_POLICY):
            removed["policy"] += 1
            continue
        kept.append(i)
        out.append(line)
        sentences += max(len(SENTENCE_END.findall(line)), 1)
    return C4Page(kept, dict(removed), lorem, curly, sentences, "\n".join(out).strip())


def c4_text(text: str, kept: Sequence[int]) -> str:
    """The kept text again from the page and the indices of its kept lines (as ``c4_page`` made it)."""
    lines = text.splitlines()
    return "\n".join(_c4_line(lines[i]) for i in kept).strip()


def document_metrics(text: str, lang: Optional[str], gopher: Optional[GopherSpec], c4: Optional[C4Spec],
                     bad_words: Optional[BadWords] = None) -> tuple[Dict[str, Optional[float]], Optional[C4Page]]:
    """Every enabled rule's measurement (none depends on a threshold), and C4's line removal (None: C4 off)."""
    m: Dict[str, Optional[float]] = gopher_metrics(text, lang, gopher) if gopher else {"words": len(_words(text))}
    page = None
    if c4 is not None:
        page = c4_page(text, c4)
        m.update({f"c4_lines_removed_{r}": page.removed.get(r, 0) for r in C4_LINE_RULES})
        m["sentences"] = page.sentences
        m["lorem_ipsum"] = float(page.lorem_ipsum)
        m["curly_braces"] = float(page.curly_braces)
        if bad_words is not None:
            found = bad_words.find(page.text, lang)
            m["bad_words"] = None if found is None else len(found)
    return m, page


def rules(gopher: Optional[GopherSpec], c4: Optional[C4Spec]) -> List[Rule]:
    """The enabled rules, in the order they are checked."""
    out: List[Rule] = []
    if gopher is not None:
        g = gopher
        out += [Rule("gopher.min_words", "words", "min", g.min_words),
                Rule("gopher.max_words", "words", "max", g.max_words),
                Rule("gopher.min_mean_word_length", "mean_word_length", "min", g.min_mean_word_length),
                Rule("gopher.max_mean_word_length", "mean_word_length", "max", g.max_mean_word_length),
                Rule("gopher.max_hash_word_ratio", "hash_word_ratio", "max", g.max_hash_word_ratio),
                Rule("gopher.max_ellipsis_word_ratio", "ellipsis_word_ratio", "max", g.max_ellipsis_word_ratio),
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
        if c4.reject_lorem_ipsum:
            out.append(Rule("c4.lorem_ipsum", "lorem_ipsum", "max", 0))
        if c4.reject_curly_braces:
            out.append(Rule("c4.curly_braces", "curly_braces", "max", 0))
        out.append(Rule("c4.min_sentences", "sentences", "min", c4.min_sentences))
        if c4.bad_words:
            out.append(Rule("c4.bad_words", "bad_words", "max", c4.max_bad_words))
    return out


def first_failure(metrics: Dict[str, Optional[float]], checked: List[Rule]) -> Optional[Rule]:
    return next((r for r in checked if r.fails(metrics.get(r.metric))), None)
