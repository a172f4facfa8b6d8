"""MinHash signatures in parallel, an LSH index (in memory or shared in Redis), verified near-duplicate pairs.

Signatures are datasketch ``MinHash`` objects fed pre-hashed shingles (``text.shingle_hashes``) through
``update_batch``; they are kept as one uint32 matrix (a row per document, the hash values a
``LeanMinHash`` holds) and wrapped in ``LeanMinHash`` only to enter or query the index.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional, Sequence

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from tqdm.auto import tqdm

from pipeline.data.workers import WorkerPool
from pipeline.dedup.text import ShingleSpec, shingle_hashes
from pipeline.errors import ConfigError, PipelineError, check, choice


class IndexBackend(StrEnum):
    memory = "memory"  # one process
    redis = "redis"  # a Redis server shared by several workers


class Verify(StrEnum):
    exact = "exact"  # Jaccard of the hashed shingle sets
    estimate = "estimate"  # from the signatures
    none = "none"  # every LSH candidate is a near-duplicate


_CHUNK = 512  # documents per task sent to a signature worker


@dataclass
class IndexSpec:
    backend: IndexBackend = IndexBackend.memory
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    workers: int = 2  # processes that insert into and query the Redis index together

    def __post_init__(self):
        self.backend = choice(IndexBackend, self.backend, "backend")
        check(self.workers >= 1, "workers", self.workers, "at least 1")


@dataclass
class NearSpec:
    enabled: bool = True
    shingles: ShingleSpec = field(default_factory=ShingleSpec)
    num_perm: int = 128
    threshold: float = 0.8  # estimated Jaccard at or above which two documents are near-duplicates
    bands: Optional[int] = 16  # LSH bands and rows per band; both None: datasketch picks them for threshold
    rows: Optional[int] = 8
    seed: int = 1  # of the permutations; documents compare only under the same seed and num_perm
    # LSH candidates are kept when their Jaccard is >= threshold: exact (of the hashed shingle sets),
    # estimate (from the signatures, +-0.035 at 0.8 with 128 permutations) or none (every candidate)
    verify: Verify = Verify.exact
    num_proc: int = 2  # processes computing signatures
    index: IndexSpec = field(default_factory=IndexSpec)

    def __post_init__(self):
        self.verify = choice(Verify, self.verify, "verify")
        check(0 < self.threshold <= 1, "threshold", self.threshold, "in (0, 1]")
        check(self.num_perm >= 2, "num_perm", self.num_perm, "at least 2")
        check(self.num_proc >= 1, "num_proc", self.num_proc, "at least 1")
        if (self.bands is None) != (self.rows is None):
            raise ConfigError("bands" if self.bands is None else "rows", "is null: set both bands and rows, or neither")
        for key in ("bands", "rows"):
            check(getattr(self, key) is None or getattr(self, key) >= 1, key, getattr(self, key), "at least 1 or null")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ConfigError("bands", f"times rows ({self.bands} x {self.rows} = {self.bands * self.rows}) exceeds "
                                       f"num_perm = {self.num_perm}: lower bands or rows, or raise num_perm")


def lsh_params(spec: NearSpec) -> tuple[int, int]:
    """(bands, rows): explicit, or datasketch's choice minimising false positives + false negatives."""
    if spec.bands is not None:
        assert spec.rows is not None and spec.bands * spec.rows <= spec.num_perm, (spec.bands, spec.rows, spec.num_perm)
        return spec.bands, spec.rows
    lsh = MinHashLSH(threshold=spec.threshold, num_perm=spec.num_perm)
    return lsh.b, lsh.r


def detection_probability(similarity: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """The chance that LSH makes two documents of this Jaccard similarity candidates: 1 - (1 - s^r)^b."""
    return 1 - (1 - np.asarray(similarity, float) ** rows) ** bands


# --- signatures ------------------------------------------------------------------------------------

_TEXTS: Sequence[str] = ()  # handed to forked workers without pickling


def _sign_range(args: tuple[int, int, ShingleSpec, int, int]) -> tuple[int, np.ndarray, np.ndarray]:
    start, stop, shingles, num_perm, seed = args
    base = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)  # shingles arrive hashed
    sig = np.empty((stop - start, num_perm), np.uint32)
    sizes = np.zeros(stop - start, np.int64)
    for k, text in enumerate(_TEXTS[start:stop]):
        hashes = shingle_hashes(text, shingles)
        sizes[k] = len(hashes)
        m = base.copy()
        m.update_batch(hashes.tolist())
        sig[k] = m.hashvalues
    return start, sig, sizes


def signatures(texts: Sequence[str], spec: NearSpec, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 [n, num_perm] signatures, shingle counts); a document with 0 shingles is too short to index."""
    global _TEXTS
    n = len(texts)
    sig = np.empty((n, spec.num_perm), np.uint32)
    sizes = np.zeros(n, np.int64)
    tasks = [(s, min(s + _CHUNK, n), spec.shingles, spec.num_perm, spec.seed) for s in range(0, n, _CHUNK)]
    bar = tqdm(total=n, desc="MinHash", unit="doc", disable=not progress)
    _TEXTS = texts
    try:
        if spec.num_proc > 1 and len(tasks) > 1:
            with WorkerPool(min(spec.num_proc, len(tasks))) as pool:
                for start, part, part_sizes in pool.imap_unordered(_sign_range, tasks):
                    sig[start:start + len(part)], sizes[start:start + len(part)] = part, part_sizes
                    bar.update(len(part))
        else:
            for task in tasks:
                start, part, part_sizes = _sign_range(task)
                sig[start:start + len(part)], sizes[start:start + len(part)] = part, part_sizes
                bar.update(len(part))
    finally:
        _TEXTS = ()
        bar.close()
    return sig, sizes


def _lean(row: np.ndarray, seed: int) -> LeanMinHash:
    return LeanMinHash(seed=seed, hashvalues=row, scheme="affine32")


def estimated_jaccard(sig: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Share of equal signature positions for each pair (a[k], b[k]), what ``MinHash.jaccard`` computes."""
    out = np.empty(len(a), np.float64)
    for s in range(0, len(a), chunk):
        out[s:s + chunk] = (sig[a[s:s + chunk]] == sig[b[s:s + chunk]]).mean(axis=1)
    return out


# --- the index -------------------------------------------------------------------------------------

def _storage(index: IndexSpec, basename: bytes) -> dict:
    return {"type": "redis", "basename": basename,
            "redis": {"host": index.host, "port": index.port, "db": index.db}}


def check_redis(index: IndexSpec):
    """A client for the configured Redis server, or one clear error saying it cannot be reached."""
    import redis

    client = redis.Redis(host=index.host, port=index.port, db=index.db, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.RedisError as e:
        raise PipelineError(f"dedup.near.index: cannot reach Redis at {index.host}:{index.port} (db {index.db}): "
                            f"{e}. Start redis-server there, or set dedup.near.index.backend=memory") from None
    return client


_JOB: dict = {}  # the forked Redis workers' view of the signatures and the index settings


def _redis_lsh() -> MinHashLSH:
    j = _JOB
    return MinHashLSH(num_perm=j["num_perm"], params=j["params"], storage_config=_storage(j["index"], j["basename"]))


def _redis_insert(keys: np.ndarray) -> int:
    lsh = _redis_lsh()
    with lsh.insertion_session() as session:
        for i in keys.tolist():
            session.insert(i, _lean(_JOB["sig"][i], _JOB["seed"]), check_duplication=False)
    return len(keys)


def _redis_query(keys: np.ndarray) -> list[tuple[int, int]]:
    lsh = _redis_lsh()
    pairs = []
    for i in keys.tolist():
        pairs.extend((j, i) for j in lsh.query(_lean(_JOB["sig"][i], _JOB["seed"])) if j < i)
    return pairs


def candidate_pairs(sig: np.ndarray, keys: np.ndarray, spec: NearSpec, progress: bool = True) -> np.ndarray:
    """LSH candidate pairs (j, i), j < i, among the rows ``keys`` of ``sig``; int64 [m, 2]."""
    params = lsh_params(spec)
    keys = np.asarray(keys, np.int64)
    if spec.index.backend == "redis":
        return _redis_pairs(sig, keys, spec, params)
    lsh = MinHashLSH(num_perm=spec.num_perm, params=params)
    pairs: list[tuple[int, int]] = []
    for i in tqdm(keys.tolist(), desc="LSH", unit="doc", disable=not progress):
        m = _lean(sig[i], spec.seed)
        pairs.extend((j, i) for j in lsh.query(m))
        lsh.insert(i, m, check_duplication=False)
    return np.array(pairs, np.int64).reshape(-1, 2)


def _redis_pairs(sig: np.ndarray, keys: np.ndarray, spec: NearSpec, params: tuple[int, int]) -> np.ndarray:
    """Every worker inserts its share into one Redis index; once all have, every worker queries its share."""
    global _JOB
    client = check_redis(spec.index)
    basename = f"pipeline-dedup-{uuid.uuid4().hex}".encode()  # this run's keys, deleted at the end
    _JOB = {"sig": sig, "seed": spec.seed, "num_perm": spec.num_perm, "params": params,
            "index": spec.index, "basename": basename}
    shares = [s for s in np.array_split(keys, max(spec.index.workers, 1)) if len(s)]
    try:
        with WorkerPool(max(len(shares), 1)) as pool:
            pool.map(_redis_insert, shares)  # a barrier: every document is indexed before any query
            found = pool.map(_redis_query, shares)
    except Exception as e:
        import redis

        if isinstance(e, redis.exceptions.RedisError):
            raise PipelineError(f"dedup.near.index: Redis at {spec.index.host}:{spec.index.port} failed: {e}") from None
        raise
    finally:
        _JOB = {}
        for batch in _batched(client.scan_iter(match=basename + b"*", count=1000), 1000):
            client.delete(*batch)
    return np.array([p for part in found for p in part], np.int64).reshape(-1, 2)


def _batched(iterable, n):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def exact_jaccard(texts: Sequence[str], pairs: np.ndarray, shingles: ShingleSpec) -> np.ndarray:
    """Jaccard similarity of the hashed shingle sets of each pair's two texts."""
    sets = {i: np.unique(shingle_hashes(texts[i], shingles)) for i in np.unique(pairs).tolist()}
    out = np.empty(len(pairs))
    for k, (a, b) in enumerate(pairs.tolist()):
        inter = len(np.intersect1d(sets[a], sets[b], assume_unique=True))
        out[k] = inter / max(len(sets[a]) + len(sets[b]) - inter, 1)
    return out


def near_duplicate_edges(sig: np.ndarray, keys: np.ndarray, spec: NearSpec, texts: Optional[Sequence[str]] = None,
                         progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(pairs [m, 2], estimated Jaccard [m]): LSH candidates among rows ``keys``, verified as spec.verify says."""
    pairs = candidate_pairs(sig, keys, spec, progress=progress)
    est = estimated_jaccard(sig, pairs[:, 0], pairs[:, 1])
    if spec.verify != "none" and len(pairs):
        if spec.verify == "exact":
            if texts is None:
                raise ValueError("verify='exact' needs the texts")
            keep = exact_jaccard(texts, pairs, spec.shingles) >= spec.threshold
        else:
            keep = est >= spec.threshold
        pairs, est = pairs[keep], est[keep]
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return pairs[order], est[order]
