"""Peak memory of near-duplicate detection on synthetic corpora of n/10 and n documents: does it grow linearly?

Each size runs in a fresh process: 100-word documents drawn from a Zipf-like vocabulary of 50,000
words, 5% of them lightly edited copies, through the stage's signatures (num_proc processes) and the
in-memory LSH index with exact verification. Peak resident memory is read from the kernel for the
main process (texts, signatures, index) and for the largest signature worker.
"""
from __future__ import annotations

import multiprocessing
import resource
import time

import numpy as np

from pipeline.dedup.minhash import NearSpec, near_duplicate_edges, signatures

GOAL = 0.8  # memory per document at n/10 over that at n: 1.0 is linear, above 1 better than linear


def synthetic(n: int, words: int = 100, vocabulary: int = 50_000, copies: float = 0.05, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(vocabulary)])
    p = 1 / np.arange(1, vocabulary + 1)
    ids = rng.choice(vocabulary, size=(n, words), p=p / p.sum())
    docs = [" ".join(row) for row in vocab[ids]]
    for i in rng.choice(n, size=int(copies * n), replace=False).tolist():
        row = ids[rng.integers(n)].copy()
        row[rng.integers(words)] = rng.integers(vocabulary)
        docs[i] = " ".join(vocab[row])
    return docs


def _measure(n: int, queue) -> None:
    started = time.perf_counter()
    docs = synthetic(n)
    spec = NearSpec()
    sig, sizes = signatures(docs, spec, progress=False)
    pairs, _ = near_duplicate_edges(sig, np.nonzero(sizes > 0)[0], spec, docs, progress=False)
    queue.put({"documents": n, "pairs": int(len(pairs)), "seconds": round(time.perf_counter() - started, 1),
               "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})


def measure(n: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(n, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    n = 20_000 if quick else 1_000_000
    small, large = measure(n // 10), measure(n)
    per_doc = [r["main_peak_mb"] * 1024 / r["documents"] for r in (small, large)]
    ratio = per_doc[0] / per_doc[1]
    return {
        "name": "dedup_memory",
        "what": "peak resident MB of the near-duplicate path at n/10 and n synthetic documents",
        "baseline": {"name": f"{n // 10:,} documents", "kb_per_doc": round(per_doc[0], 2), **small},
        "candidate": {"name": f"{n:,} documents", "kb_per_doc": round(per_doc[1], 2), **large},
        "note": f"{n:,} documents: main process peak {large['main_peak_mb'] / 1024:.2f} GiB, "
                f"largest worker {large['worker_peak_mb'] / 1024:.2f} GiB, {large['seconds']} s",
        "overrides": list(overrides),
        "ratio": round(ratio, 3),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
    }
