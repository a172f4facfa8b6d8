"""Text normalisation and shingling, shared by exact dedup, MinHash signatures and the evaluation.

Shingles are hashed without Python's per-process ``hash`` so every worker, process or machine gives
the same value: words are hashed with CRC-32, and an n-gram of word (or character) hashes is combined
with a polynomial in uint64 arithmetic, then folded to the 32 bits datasketch's MinHash expects.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from pipeline.errors import check, choice

WORD = re.compile(r"\w+")
SPACE = re.compile(r"\s+")


class ShingleKind(StrEnum):
    word = "word"
    char = "char"


_P = np.uint64(0x100000001B3)  # the 64-bit FNV prime: odd, so the polynomial mixes every position


@dataclass
class Normalisation:
    lowercase: bool = True
    unicode_nfkc: bool = True  # fold compatibility characters (ligatures, full-width forms)
    strip_punctuation: bool = True  # keep only word characters, joined by single spaces


@dataclass
class ShingleSpec(Normalisation):
    kind: ShingleKind = ShingleKind.word  # n-grams of words or of characters
    n: int = 5  # shingle length in words or characters

    def __post_init__(self):
        self.kind = choice(ShingleKind, self.kind, "kind")
        check(self.n >= 1, "n", self.n, "at least 1")


def normalise(text: str, spec: Normalisation) -> str:
    """The text that shingles (and exact hashes) are taken from: words separated by single spaces."""
    if spec.unicode_nfkc:
        text = unicodedata.normalize("NFKC", text)
    if spec.lowercase:
        text = text.lower()
    if spec.strip_punctuation:
        return " ".join(WORD.findall(text))
    return SPACE.sub(" ", text).strip()


def exact_key(text: str, spec: Normalisation) -> bytes:
    """A 16-byte digest of the normalised text: equal for texts that differ only in case, spacing, punctuation."""
    return hashlib.blake2b(normalise(text, spec).encode("utf-8"), digest_size=16).digest()


def _units(norm: str, kind: str) -> np.ndarray:
    if kind == "word":
        words = norm.split(" ") if norm else []
        return np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), np.uint64, len(words))
    return np.frombuffer(norm.encode("utf-32-le"), np.uint32).astype(np.uint64)


def shingle_hashes(text: str, spec: ShingleSpec) -> np.ndarray:
    """uint32 hashes of the text's n-grams (repeats included); empty when the text is shorter than one n-gram."""
    units = _units(normalise(text, spec), spec.kind)
    m = len(units) - spec.n + 1
    if m <= 0:
        return np.zeros(0, np.uint32)
    acc = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(spec.n):
            acc = acc * _P + units[k:k + m]
        return (acc ^ (acc >> np.uint64(32))).astype(np.uint32)


def shingle_set(text: str, spec: ShingleSpec) -> set[str]:
    """The n-grams themselves, for the true Jaccard similarity the evaluation compares against."""
    norm = normalise(text, spec)
    if spec.kind == "word":
        words = norm.split(" ") if norm else []
        return {" ".join(words[i:i + spec.n]) for i in range(len(words) - spec.n + 1)}
    return {norm[i:i + spec.n] for i in range(len(norm) - spec.n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
