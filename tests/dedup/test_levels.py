"""Each dedup level on small real tables: who is removed, in favour of whom, and nothing lost."""
from __future__ import annotations

import multiprocessing

import numpy as np
import pyarrow as pa
import pytest

from pipeline.dedup.evaluate import edit_words
from pipeline.dedup.minhash import NearSpec, signatures
from pipeline.dedup.run import DedupSpec, deduplicate
from pipeline.dedup.text import ShingleSpec, exact_key, shingle_hashes
from pipeline.dedup.urls import canonical_url
from pipeline.errors import BadInput


def _spec(**levels) -> DedupSpec:
    spec = DedupSpec()
    for name in ("url", "exact", "near", "lines"):
        getattr(spec, name).enabled = name in levels
        for key, value in (levels.get(name) or {}).items():
            setattr(getattr(spec, name), key, value)
    spec.near.num_proc = 1
    return spec


def _table(texts, **columns) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts, **columns})


def _removed(result) -> dict:
    return {r["id"]: (r["level"], r["duplicate_of"]) for r in result.removed.to_pylist()}


def test_canonical_url_merges_spellings_of_one_page():
    same = ["https://www.Example.com/a/b/?utm_source=x&q=1&p=2#top", "http://example.com:80/a/b?p=2&q=1",
            "https://example.com/a/b?q=1&p=2&fbclid=abc"]
    assert len({canonical_url(u) for u in same}) == 1
    assert canonical_url("https://example.com/a/c") != canonical_url(same[0])
    assert canonical_url("https://example.com:8443/a/b") != canonical_url("https://example.com/a/b")
    assert canonical_url(None) is None and canonical_url("not a url") is None and canonical_url("http://[::1") is None


def test_shingle_hashes_are_the_same_in_another_process(passages):
    spec = ShingleSpec()
    here = shingle_hashes(passages[0], spec)
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh interpreter: another hash seed
        there = pool.apply(shingle_hashes, (passages[0], spec))
    assert np.array_equal(here, there) and len(here) > 100
    assert exact_key("Hello,  World!", spec) == exact_key("hello world", spec) != exact_key("hello there", spec)
    assert len(shingle_hashes("four words only here", spec)) == 0
    assert len(shingle_hashes("abcdef", ShingleSpec(kind="char", n=3))) == 4


def test_signatures_match_datasketch_and_do_not_depend_on_processes(passages):
    from datasketch import MinHash

    spec = NearSpec(num_proc=1)
    serial, sizes = signatures(passages, spec, progress=False)
    parallel, _ = signatures(passages, NearSpec(num_proc=2), progress=False)
    assert np.array_equal(serial, parallel) and (sizes > 100).all()
    m = MinHash(num_perm=spec.num_perm, seed=spec.seed, hashfunc=int)  # the plain datasketch way, one by one
    for h in shingle_hashes(passages[3], spec.shingles).tolist():
        m.update(h)
    assert np.array_equal(m.hashvalues, serial[3])


def test_url_level_keeps_first_or_newest(passages):
    urls = ["https://a.org/x", "http://www.a.org/x/", "https://a.org/y", None, None]
    dates = ["2020-01-01", "2024-05-01", "2021-01-01", None, None]
    texts = passages[:5]
    first = deduplicate(_table(texts, url=urls, date=dates), _spec(url={}), progress=False)
    assert _removed(first) == {"d1": ("url", "d0")}
    newest = deduplicate(_table(texts, url=urls, date=dates), _spec(url={"keep": "newest"}), progress=False)
    assert _removed(newest) == {"d0": ("url", "d1")}
    assert first.stats["url_missing"] == 2


def test_exact_level_ignores_case_and_spacing_and_keeps_by_policy(passages):
    texts = [passages[0], passages[1], passages[0].upper().replace(" ", "   "), passages[0] + " !!"]
    quality = [0.5, 0.9, 0.99, 0.7]
    result = deduplicate(_table(texts, lang_score=quality), _spec(exact={}), progress=False)
    assert _removed(result) == {"d2": ("exact", "d0"), "d3": ("exact", "d0")}
    spec = _spec(exact={})
    spec.keep = "quality"
    result = deduplicate(_table(texts, lang_score=quality), spec, progress=False)
    assert _removed(result) == {"d0": ("exact", "d2"), "d3": ("exact", "d2")}
    assert result.kept.column("duplicates").to_pylist() == [0, 2]  # d1, d2 (with 2 copies removed)
    spec.quality_field = "nope"
    with pytest.raises(BadInput, match="'nope'"):
        deduplicate(_table(texts), spec, progress=False)


def test_near_level_finds_light_edits_not_heavy_ones(passages):
    rng = np.random.default_rng(0)
    vocabulary = sorted({w for p in passages[:20] for w in p.split()})
    light = [edit_words(p, 0.005, vocabulary, rng) for p in passages[:10]]
    heavy = [edit_words(p, 0.2, vocabulary, rng) for p in passages[10:20]]
    texts = passages[:20] + light + heavy
    spec = _spec(near={})
    spec.keep = "longest"
    result = deduplicate(_table(texts), spec, progress=False)
    removed = _removed(result)
    pairs = {frozenset((f"d{i}", f"d{20 + i}")) for i in range(10)}
    assert {frozenset((k, v[1])) for k, v in removed.items()} == pairs
    assert all(level == "near" for level, _ in removed.values())
    for r in result.removed.to_pylist():
        assert 0.8 <= r["jaccard"] <= 1.0
        longer = max((r["id"], r["duplicate_of"]), key=lambda i: len(texts[int(i[1:])]))
        assert r["duplicate_of"] == longer
    assert result.kept.num_rows + result.removed.num_rows == len(texts) == result.stats["input"]


def test_clusters_follow_removals_across_levels(passages):
    # d1 is d0's URL twin, d2 is d0's exact copy, d3 a near copy of d2: all four are one cluster kept as d0
    texts = [passages[0], passages[5], passages[0], passages[0] + " And one more sentence at the end."]
    urls = ["https://a.org/p", "https://a.org/p#x", None, None]
    result = deduplicate(_table(texts, url=urls), _spec(url={}, exact={}, near={}), progress=False)
    assert _removed(result) == {"d1": ("url", "d0"), "d2": ("exact", "d0"), "d3": ("near", "d0")}
    assert result.stats["cluster_sizes"] == {4: 1} and result.kept.column("duplicates").to_pylist() == [3]
    assert result.removed.to_pylist()[1]["jaccard"] == 1.0


def test_lines_level_cuts_boilerplate_and_removes_documents_left_empty(passages):
    nav = "Home | About | Contact"
    texts = [f"{nav}\n{p}\nAll rights reserved." for p in passages[:6]] + [f"{nav}\nAll rights reserved."]
    result = deduplicate(_table(texts), _spec(lines={"min_documents": 5}), progress=False)
    assert _removed(result) == {"d6": ("lines", None)}
    kept = result.kept.to_pylist()
    assert [k["text"] for k in kept] == [p.strip("\n") for p in passages[:6]]
    assert all(k["lines_removed"] == 2 for k in kept)
    assert result.removed.to_pylist()[0]["text"] == texts[6]  # the removed document keeps its original text
    assert dict(result.stats["lines_top"]) == {"home | about | contact": 7, "all rights reserved.": 7}


def test_bad_documents_are_counted_not_lost(passages):
    texts = ["", "   \n ", "too short", passages[0], None]
    result = deduplicate(_table(texts), _spec(exact={}, near={}), progress=False)
    assert _removed(result) == {"d0": ("empty", None), "d1": ("empty", None), "d4": ("empty", None)}
    assert result.stats["near_too_short"] == 1 and result.kept.num_rows == 2
    with pytest.raises(BadInput, match=r"ids occur more than once, e.g. 'x' \(2x\)"):
        deduplicate(pa.table({"id": ["x", "y", "x"], "text": passages[:3]}), _spec(), progress=False)
    with pytest.raises(BadInput, match="no 'text' column"):
        deduplicate(pa.table({"body": ["a"]}), _spec(), progress=False)
    no_ids = deduplicate(pa.table({"text": [passages[0], passages[0]]}), _spec(exact={}), progress=False)
    assert _removed(no_ids) == {"row-1": ("exact", "row-0")}
