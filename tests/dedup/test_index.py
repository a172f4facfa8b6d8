"""The LSH index in memory and shared in a real Redis server; the precision/recall evaluation."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from pipeline.config import compose
from pipeline.dedup.evaluate import EvalSpec, edit_words, evaluate_near
from pipeline.dedup.minhash import IndexSpec, NearSpec, lsh_params, near_duplicate_edges, signatures
from pipeline.dedup.text import jaccard, shingle_set
from pipeline.errors import PipelineError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_port(tmp_path):
    """A real redis-server on a free loopback port, stopped afterwards (CI installs Debian's package)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    import redis

    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def corpus(passages) -> list[str]:
    rng = np.random.default_rng(1)
    vocabulary = sorted({w for p in passages for w in p.split()})
    copies = [edit_words(p, rate, vocabulary, rng) for p, rate in zip(passages[:60], [0.0, 0.005, 0.01, 0.03] * 15)]
    return passages + copies


def test_two_redis_workers_find_the_same_pairs_as_one_process(corpus, redis_port):
    import redis

    memory = NearSpec(num_proc=1)
    sig, sizes = signatures(corpus, memory, progress=False)
    keys = np.nonzero(sizes > 0)[0]
    expected, est = near_duplicate_edges(sig, keys, memory, corpus, progress=False)
    assert len(expected) >= 30  # the planted copies with few edits, at least
    shared = NearSpec(num_proc=1, index=IndexSpec(backend="redis", port=redis_port, workers=2))
    pairs, est2 = near_duplicate_edges(sig, keys, shared, corpus, progress=False)
    assert np.array_equal(pairs, expected) and np.array_equal(est, est2)
    assert redis.Redis(port=redis_port).dbsize() == 0  # the run's keys are gone


def test_unreachable_redis_is_one_clear_error(corpus):
    spec = NearSpec(num_proc=1, index=IndexSpec(backend="redis", port=_free_port()))
    sig, sizes = signatures(corpus[:5], spec, progress=False)
    with pytest.raises(PipelineError, match=r"cannot reach Redis at 127\.0\.0\.1:\d+ .*backend=memory"):
        near_duplicate_edges(sig, np.arange(5), spec, corpus[:5], progress=False)


def test_verified_pairs_agree_with_true_jaccard(corpus):
    spec = NearSpec(num_proc=2, verify="none")
    sig, sizes = signatures(corpus, spec, progress=False)
    candidates, _ = near_duplicate_edges(sig, np.arange(len(corpus)), spec, corpus, progress=False)
    spec.verify = "exact"
    verified, _ = near_duplicate_edges(sig, np.arange(len(corpus)), spec, corpus, progress=False)
    assert len(verified) < len(candidates)
    sets = [shingle_set(t, spec.shingles) for t in corpus]
    for a, b in verified.tolist():
        assert jaccard(sets[a], sets[b]) >= spec.threshold - 1e-9
    for a, b in candidates.tolist():
        if [a, b] not in verified.tolist():
            assert jaccard(sets[a], sets[b]) < spec.threshold


def test_evaluation_plants_copies_and_scores_the_detector(passages):
    report = evaluate_near(passages, NearSpec(num_proc=1), EvalSpec(planted=70, max_docs=1000), progress=False)
    rates = report["by_edit_rate"]
    similarity = [rates[r]["mean_jaccard"] for r in sorted(rates, key=float)]
    assert similarity[0] == 1.0 and all(a > b for a, b in zip(similarity, similarity[1:]))
    assert rates["0"]["detected"] == 1.0 and rates["0.1"]["detected"] == 0.0
    o = report["overall"]
    assert o["true_pairs"] >= 30 and o["precision"] >= 0.95 and o["recall"] >= 0.9
    # Verifying by the signatures' estimate instead trades precision near the threshold: still scored honestly
    loose = evaluate_near(passages, NearSpec(num_proc=1, verify="none", bands=32, rows=2),
                          EvalSpec(planted=70, max_docs=1000), progress=False)
    assert loose["overall"]["precision"] < o["precision"] and loose["overall"]["recall"] >= o["recall"]


def test_lsh_bands_and_rows_are_checked_when_the_config_is_built():
    with pytest.raises(PipelineError, match=r"'dedup\.near\.bands' times rows \(32 x 8 = 256\) exceeds num_perm = 128"):
        compose("dedup.near.bands=32")
    with pytest.raises(PipelineError, match=r"'dedup\.near\.rows' is null: set both bands and rows, or neither"):
        compose("dedup.near.rows=null")
    assert lsh_params(compose("dedup.near.bands=null", "dedup.near.rows=null").dedup.near) == (9, 13)  # datasketch's
