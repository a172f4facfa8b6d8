"""Language identification with py3langid's bundled model (no download), normalised probabilities."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import List

from pipeline.errors import check


@dataclass
class LangIdSpec:
    enabled: bool = True
    languages: List[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes to keep; [] keeps any
    min_score: float = 0.65  # probability of the top language, from 0 to 1; lower is rejected (langid.min_score)
    max_chars: int = 10_000  # classify this many characters from the start (enough for a stable answer)

    def __post_init__(self):
        check(0 <= self.min_score <= 1, "min_score", self.min_score, "in [0, 1]")
        check(self.max_chars >= 1, "max_chars", self.max_chars, "at least 1")


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> List[str]:
    return list(_identifier().nb_classes)


def identify(text: str, max_chars: int) -> tuple[str, float]:
    """(language code, probability) of ``text``'s first ``max_chars`` characters."""
    lang, score = _identifier().classify(text[:max_chars].replace("\n", " "))
    return lang, float(score)
