"""Measured quality of near-duplicate detection: precision and recall against true Jaccard similarity.

The corpus is joined by planted copies of some of its documents with a known share of words edited,
so pairs on both sides of the threshold exist whatever the corpus holds. Among a sample of documents
(all of them, up to ``max_docs``, planted copies always included) the true Jaccard similarity of every
pair's shingle sets is computed exactly (a sparse product of document-shingle incidence), and compared
with the pairs the detector reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.sparse import csr_matrix, triu

from pipeline.dedup.minhash import NearSpec, detection_probability, lsh_params, near_duplicate_edges, signatures
from pipeline.dedup.text import shingle_set
from pipeline.errors import check


@dataclass
class EvalSpec:
    enabled: bool = False  # also run the evaluation inside the dedup stage
    planted: int = 300  # copies of corpus documents with words edited
    edit_rates: list = field(default_factory=lambda: [0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1])
    min_words: int = 50  # only documents at least this long are copied
    max_docs: int = 3000  # true Jaccard of all pairs among at most this many documents (a random sample)
    min_similarity: float = 0.3  # pairs at least this similar are listed in the detection curve
    seed: int = 0
    include_filter_rejected: bool = False  # also use pages the filter stage rejected (they have text)

    def __post_init__(self):
        check(self.max_docs >= 2, "max_docs", self.max_docs, "at least 2")


def edit_words(text: str, rate: float, vocabulary: Sequence[str], rng: np.random.Generator) -> str:
    """The text with each word, with probability ``rate``, replaced, deleted, or followed by a new word."""
    out = []
    for word in text.split():
        if rng.random() >= rate:
            out.append(word)
            continue
        op = rng.integers(3)
        if op == 0:
            out.append(vocabulary[rng.integers(len(vocabulary))])
        elif op == 2:
            out.extend((word, vocabulary[rng.integers(len(vocabulary))]))
    return " ".join(out)


def plant(texts: Sequence[str], spec: EvalSpec) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(planted texts, the row each copies, its edit rate)."""
    rng = np.random.default_rng(spec.seed)
    eligible = np.array([i for i, t in enumerate(texts) if len(t.split()) >= spec.min_words], np.int64)
    if not len(eligible) or not spec.planted:
        return [], np.zeros(0, np.int64), np.zeros(0)
    origin = rng.choice(eligible, size=min(spec.planted, len(eligible)), replace=False)
    rates = np.resize(np.asarray(spec.edit_rates, float), len(origin))
    vocabulary = sorted({w for i in origin[:200].tolist() for w in texts[i].split()})
    return [edit_words(texts[i], r, vocabulary, rng) for i, r in zip(origin.tolist(), rates)], origin, rates


def true_similarities(texts: Sequence[str], rows: np.ndarray, near: NearSpec, min_similarity: float):
    """(pairs [m, 2] of rows, Jaccard [m]) for every pair among ``rows`` at least ``min_similarity`` similar."""
    vocab: dict[str, int] = {}
    indptr, indices, sizes = [0], [], []
    for i in rows.tolist():
        s = shingle_set(texts[i], near.shingles)
        indices.extend(vocab.setdefault(x, len(vocab)) for x in s)
        indptr.append(len(indices))
        sizes.append(len(s))
    m = csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(rows), max(len(vocab), 1)))
    inter = triu(m @ m.T, k=1).tocoo()
    sizes = np.asarray(sizes, np.float64)
    jac = inter.data / (sizes[inter.row] + sizes[inter.col] - inter.data)
    keep = jac >= min_similarity
    pairs = np.stack([rows[inter.row[keep]], rows[inter.col[keep]]], axis=1)
    pairs.sort(axis=1)
    return pairs, jac[keep]


def _pair_keys(pairs: np.ndarray, n: int) -> np.ndarray:
    return pairs[:, 0].astype(np.int64) * n + pairs[:, 1]


def evaluate_near(texts: Sequence[str], near: NearSpec, spec: EvalSpec, progress: bool = True) -> dict:
    """Precision and recall of near-duplicate pairs at ``near.threshold``; also per edit rate and a detection curve."""
    texts = list(texts)
    planted, origin, rates = plant(texts, spec)
    n_real = len(texts)
    texts += planted
    n = len(texts)
    sig, sizes = signatures(texts, near, progress=progress)
    indexed = np.nonzero(sizes > 0)[0]
    detected, _ = near_duplicate_edges(sig, indexed, near, texts, progress=progress)

    rng = np.random.default_rng(spec.seed + 1)
    real_rows = np.nonzero(sizes[:n_real] > 0)[0]
    budget = max(spec.max_docs - 2 * len(planted), 0)
    sample = real_rows if len(real_rows) <= budget else rng.choice(real_rows, size=budget, replace=False)
    sample = np.unique(np.concatenate([sample, origin, np.arange(n_real, n)])).astype(np.int64)
    sample = sample[sizes[sample] > 0]
    pairs, jac = true_similarities(texts, sample, near, min(spec.min_similarity, near.threshold))

    in_sample = np.zeros(n, bool)
    in_sample[sample] = True
    detected = detected[in_sample[detected[:, 0]] & in_sample[detected[:, 1]]]
    found = np.isin(_pair_keys(pairs, n), _pair_keys(detected, n))
    positive = jac >= near.threshold
    planted_pair = pairs[:, 1] >= n_real

    def pr(mask: np.ndarray) -> dict:
        tp = int(np.count_nonzero(found & positive & mask))
        det = int(np.count_nonzero(found & mask))
        pos = int(np.count_nonzero(positive & mask))
        return {"true_pairs": pos, "detected_pairs": det, "true_positives": tp,
                "precision": tp / det if det else float("nan"), "recall": tp / pos if pos else float("nan")}

    # Detected pairs below min_similarity are not in `pairs`; they are false positives all the same.
    extra = int(len(detected)) - int(np.count_nonzero(found))
    overall = pr(np.ones(len(pairs), bool))
    overall["detected_pairs"] += extra
    detected_pairs = overall["detected_pairs"]
    overall["precision"] = overall["true_positives"] / detected_pairs if detected_pairs else float("nan")
    copies = {}
    origin_pair = _pair_keys(np.sort(np.stack([origin, np.arange(n_real, n)], axis=1), axis=1), n)
    where = {k: i for i, k in enumerate(_pair_keys(pairs, n).tolist())}
    for rate in sorted(set(rates.tolist())):
        idx = [where.get(k) for k, r in zip(origin_pair.tolist(), rates.tolist()) if r == rate]
        sims = np.array([jac[i] if i is not None else 0.0 for i in idx])
        hits = np.array([bool(found[i]) if i is not None else False for i in idx])
        copies[f"{rate:g}"] = {"copies": len(idx), "mean_jaccard": float(sims.mean()) if len(sims) else float("nan"),
                               "detected": float(hits.mean()) if len(hits) else float("nan")}
    bands, rows = lsh_params(near)
    return {"threshold": near.threshold, "bands": bands, "rows": rows, "num_perm": near.num_perm,
            "verify": near.verify, "documents": n_real, "planted": len(planted), "sampled_documents": int(len(sample)),
            "overall": overall, "real": pr(~planted_pair), "planted_pairs": pr(planted_pair), "by_edit_rate": copies,
            "curve": {"jaccard": jac.tolist(), "detected": found.tolist()},
            "lsh_probability_at_threshold": float(detection_probability(near.threshold, bands, rows))}
