"""Near-duplicate throughput (documents/s): the dedup stage's MinHash + LSH path vs a naive datasketch loop.

Naive: one ``MinHash`` per document updated shingle by shingle (SHA-1, datasketch's default), then
``MinHashLSH.query`` and ``insert``, in one process. Candidate: the stage's path — pre-hashed shingles fed to
``update_batch`` in ``num_proc`` processes, the LSH index, pairs verified by true Jaccard. Also measured in
the same run: ``MinHash.bulk`` (datasketch's batch path, SHA-1, one process) for the signatures alone.
The naive loop is timed on a random subset of the same documents (its rate is per document).
"""
from __future__ import annotations

import gzip
import statistics
import time

import numpy as np
from datasketch import MinHash, MinHashLSH

from pipeline.config import compose
from pipeline.dedup.evaluate import edit_words
from pipeline.dedup.minhash import NearSpec, lsh_params, near_duplicate_edges, signatures
from pipeline.dedup.text import normalise

GOAL = 8.0


def corpus(data_dir: str, n: int, chars: int = 1000, copies: float = 0.1, seed: int = 0) -> list[str]:
    """n documents: the public-domain novels cut into ~chars-character pieces, a share replaced by edited copies."""
    from pathlib import Path

    pieces = []
    for f in sorted(Path(data_dir, "pretrain/english_novels").glob("*.txt.gz")):
        text = gzip.open(f, "rt", encoding="utf-8").read()
        pieces += [text[i:i + chars] for i in range(0, len(text) - chars, chars)]
        if len(pieces) >= n:
            break
    rng = np.random.default_rng(seed)
    docs = [pieces[i] for i in rng.permutation(len(pieces))[:n]]
    vocabulary = sorted({w for d in docs[:500] for w in d.split()})
    for i in rng.choice(len(docs), size=int(copies * len(docs)), replace=False).tolist():
        docs[i] = edit_words(docs[int(rng.integers(len(docs)))], 0.01, vocabulary, rng)
    return docs


def _shingles(text: str, spec: NearSpec) -> list[bytes]:
    words = normalise(text, spec.shingles).split(" ")
    n = spec.shingles.n
    return [" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    cfg = compose(*overrides)
    spec = cfg.dedup.near
    n, n_naive, repeats = (2000, 300, 2) if quick else (20000, 2000, 3)
    docs = corpus(cfg.paths.data_dir, n)
    subset = [docs[i] for i in np.random.default_rng(1).choice(n, size=n_naive, replace=False).tolist()]
    params = lsh_params(spec)

    def naive() -> float:
        lsh = MinHashLSH(num_perm=spec.num_perm, params=params)
        started = time.perf_counter()
        for i, text in enumerate(subset):
            m = MinHash(num_perm=spec.num_perm, seed=spec.seed)
            for shingle in _shingles(text, spec):
                m.update(shingle)
            lsh.query(m)
            lsh.insert(i, m)
        return len(subset) / (time.perf_counter() - started)

    def bulk() -> float:
        started = time.perf_counter()
        MinHash.bulk((_shingles(t, spec) for t in subset), num_perm=spec.num_perm, seed=spec.seed)
        return len(subset) / (time.perf_counter() - started)

    def stage() -> float:
        started = time.perf_counter()
        sig, sizes = signatures(docs, spec, progress=False)
        near_duplicate_edges(sig, np.nonzero(sizes > 0)[0], spec, docs, progress=False)
        return n / (time.perf_counter() - started)

    naive_runs, bulk_runs, stage_runs = [], [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits all sides alike
        naive_runs.append(naive())
        bulk_runs.append(bulk())
        stage_runs.append(stage())
    baseline, fast, candidate = (statistics.median(r) for r in (naive_runs, bulk_runs, stage_runs))
    return {
        "name": "dedup_near",
        "what": "documents/s through MinHash signatures and the LSH index: dedup stage vs naive datasketch loop",
        "corpus": {"documents": n, "naive_subset": n_naive, "chars_per_document": 1000, "edited_copies": 0.1,
                   "shingles": f"{spec.shingles.n}-{spec.shingles.kind}s", "num_perm": spec.num_perm,
                   "bands_rows": list(params)},
        "baseline": {"name": "MinHash.update per shingle + LSH query/insert, 1 process", "docs_per_s": round(baseline, 1),
                     "runs": [round(x, 1) for x in naive_runs]},
        "minhash_bulk": {"docs_per_s": round(fast, 1), "runs": [round(x, 1) for x in bulk_runs],
                         "ratio": round(fast / baseline, 2)},
        "note": f"datasketch MinHash.bulk alone (signatures, 1 process): {fast:.0f} docs/s, {fast / baseline:.1f}x naive",
        "candidate": {"name": f"stage: signatures (num_proc={spec.num_proc}) + LSH + exact verify",
                      "docs_per_s": round(candidate, 1), "runs": [round(x, 1) for x in stage_runs]},
        "overrides": list(overrides),
        "ratio": round(candidate / baseline, 2),
        "goal": GOAL,
        "meets_goal": candidate / baseline >= GOAL,
    }
