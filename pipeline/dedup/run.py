"""The four levels in order (URL, exact, near-duplicate, lines) over one table of documents.

Every removed document records the level that removed it, the id of the document it duplicates and
their estimated Jaccard similarity; kept + removed = input.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.dedup.lines import LinesSpec, frequent_lines, remove_lines
from pipeline.dedup.minhash import NearSpec, estimated_jaccard, lsh_params, near_duplicate_edges, signatures
from pipeline.dedup.text import Normalisation, exact_key
from pipeline.dedup.urls import canonical_url
from pipeline.errors import BadInput, choice

LEVELS = ("empty", "url", "exact", "near", "lines")


class KeepPolicy(StrEnum):
    first = "first"
    longest = "longest"
    quality = "quality"  # highest quality_field


class UrlPolicy(StrEnum):
    first = "first"
    newest = "newest"  # by the `date` column


@dataclass
class UrlSpec:
    enabled: bool = True
    keep: UrlPolicy = UrlPolicy.first  # among documents with one canonical URL

    def __post_init__(self):
        self.keep = choice(UrlPolicy, self.keep, "keep")


@dataclass
class ExactSpec(Normalisation):
    enabled: bool = True  # documents whose normalised texts are equal


@dataclass
class DedupSpec:
    url: UrlSpec = field(default_factory=UrlSpec)
    exact: ExactSpec = field(default_factory=ExactSpec)
    near: NearSpec = field(default_factory=NearSpec)
    lines: LinesSpec = field(default_factory=LinesSpec)
    keep: KeepPolicy = KeepPolicy.first  # in an exact or near-duplicate cluster
    quality_field: str = "lang_score"  # column (a.b for a struct field) read by keep=quality; higher is better

    def __post_init__(self):
        self.keep = choice(KeepPolicy, self.keep, "keep")


@dataclass
class DedupResult:
    kept: pa.Table
    removed: pa.Table
    stats: dict
    signatures: Optional[np.ndarray] = None  # rows of the input, for the evaluation
    shingle_counts: Optional[np.ndarray] = None


def _column(table: pa.Table, name: str) -> Optional[pa.ChunkedArray]:
    """A column, or a struct field named a.b; None when missing."""
    head, _, rest = name.partition(".")
    if head not in table.column_names:
        return None
    col = table.column(head)
    for part in rest.split(".") if rest else []:
        if not pa.types.is_struct(col.type) or col.type.get_field_index(part) < 0:
            return None
        col = pc.struct_field(col, part)
    return col


def document_ids(table: pa.Table, label: str) -> list[str]:
    """The `id` column (made up from the row number when absent); duplicates are one clear error."""
    if "id" not in table.column_names:
        return [f"row-{i}" for i in range(table.num_rows)]
    ids = [str(x) if x is not None else f"row-{i}" for i, x in enumerate(table.column("id").to_pylist())]
    repeated = [(k, c) for k, c in Counter(ids).items() if c > 1]
    if repeated:
        shown = ", ".join(f"'{k}' ({c}x)" for k, c in repeated[:5])
        raise BadInput(f"{label}: {len(repeated)} document ids occur more than once, e.g. {shown}; "
                       "ids must be unique so removed documents can name the one they duplicate")
    return ids


def _keepers(labels: np.ndarray, score: np.ndarray) -> np.ndarray:
    """For rows in a group (label >= 0), the row kept for their group: highest score, then first."""
    dup_of = np.full(len(labels), -1, np.int64)
    rows = np.nonzero(labels >= 0)[0]
    if not len(rows):
        return dup_of
    order = rows[np.lexsort((rows, -score[rows], labels[rows]))]
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    keeper = order[first][np.cumsum(first) - 1]
    dup_of[order] = np.where(order == keeper, -1, keeper)
    return dup_of


def _labels(keys: list, alive: np.ndarray) -> np.ndarray:
    """Group number per row for rows that are alive and share a key with another alive row; else -1."""
    counts = Counter(k for k, a in zip(keys, alive) if a and k is not None)
    numbers = {k: i for i, k in enumerate(k for k, c in counts.items() if c > 1)}
    return np.array([numbers.get(k, -1) if a and k is not None else -1 for k, a in zip(keys, alive)], np.int64)


def _policy_score(policy: str, table: pa.Table, texts: list[str], quality_field: str) -> np.ndarray:
    if policy == "longest":
        return np.array([len(t) for t in texts], np.float64)
    if policy == "quality":
        col = _column(table, quality_field)
        if col is None:
            raise BadInput(f"dedup.keep=quality reads the column '{quality_field}' (dedup.quality_field), "
                           f"which the input lacks; its columns: {', '.join(table.column_names)}")
        values = np.array([np.nan if v is None else float(v) for v in col.to_pylist()], np.float64)
        return np.nan_to_num(values, nan=-np.inf)
    return np.zeros(len(texts))


def deduplicate(table: pa.Table, spec: DedupSpec, label: str = "dedup input", progress: bool = True) -> DedupResult:
    if "text" not in table.column_names:
        raise BadInput(f"{label}: no 'text' column (columns: {', '.join(table.column_names)})")
    n = table.num_rows
    ids = document_ids(table, label)
    if "id" not in table.column_names:  # so removed documents and the ones they duplicate can be found
        table = table.add_column(0, "id", pa.array(ids, pa.string()))
    texts = [t or "" for t in table.column("text").to_pylist()]
    alive = np.ones(n, bool)
    level = np.full(n, -1, np.int8)  # index into LEVELS for removed rows
    dup_of = np.full(n, -1, np.int64)
    jac = np.full(n, np.nan)
    stats: dict = {"input": n, "removed": {lv: 0 for lv in LEVELS}}

    def remove(rows: np.ndarray, lv: str, keeper: Optional[np.ndarray] = None, similarity=None) -> None:
        alive[rows] = False
        level[rows] = LEVELS.index(lv)
        if keeper is not None:
            dup_of[rows] = keeper
        if similarity is not None:
            jac[rows] = similarity
        stats["removed"][lv] += int(len(rows))

    remove(np.array([i for i, t in enumerate(texts) if not t.strip()], np.int64), "empty")

    sig = sizes = None
    if spec.near.enabled:
        started = time.perf_counter()
        sig, sizes = signatures(texts, spec.near, progress=progress)
        seconds = time.perf_counter() - started
        sizes[~alive] = 0
        stats["near_signature_seconds"] = seconds
        stats["near_signature_docs_per_s"] = n / max(seconds, 1e-9)
        stats["near_too_short"] = int(np.count_nonzero(alive & (sizes == 0)))

    def similarity(rows: np.ndarray, keeper: np.ndarray) -> np.ndarray:
        if sig is None:
            return np.full(len(rows), np.nan)
        est = estimated_jaccard(sig, rows, keeper)
        return np.where((sizes[rows] > 0) & (sizes[keeper] > 0), est, np.nan)

    if spec.url.enabled:
        urls = [canonical_url(u) for u in table.column("url").to_pylist()] if "url" in table.column_names else [None] * n
        stats["url_missing"] = sum(u is None for u, a in zip(urls, alive) if a)
        if spec.url.keep == "newest":
            dates = [d or "" for d in table.column("date").to_pylist()] if "date" in table.column_names else [""] * n
            score = np.unique(np.array(dates, object), return_inverse=True)[1].astype(np.float64)
        else:
            score = np.zeros(n)
        keeper = _keepers(_labels(urls, alive), score)
        rows = np.nonzero(keeper >= 0)[0]
        remove(rows, "url", keeper[rows], similarity(rows, keeper[rows]))

    score = _policy_score(spec.keep, table, texts, spec.quality_field)
    if spec.exact.enabled:
        keys = [exact_key(t, spec.exact) if a else None for t, a in zip(texts, alive)]
        keeper = _keepers(_labels(keys, alive), score)
        rows = np.nonzero(keeper >= 0)[0]
        remove(rows, "exact", keeper[rows], 1.0)

    if spec.near.enabled:
        bands, rows_per_band = lsh_params(spec.near)
        candidates = np.nonzero(alive & (sizes > 0))[0]
        started = time.perf_counter()
        pairs, _ = near_duplicate_edges(sig, candidates, spec.near, texts, progress=progress)
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        _, component = connected_components(graph, directed=False)
        in_cluster = np.zeros(n, bool)
        in_cluster[pairs.ravel()] = True
        keeper = _keepers(np.where(in_cluster, component, -1), score)
        rows = np.nonzero(keeper >= 0)[0]
        remove(rows, "near", keeper[rows], similarity(rows, keeper[rows]))
        stats.update(near_bands=bands, near_rows=rows_per_band, near_pairs=int(len(pairs)),
                     near_index_seconds=time.perf_counter() - started, near_indexed=int(len(candidates)))

    lines_removed = np.zeros(n, np.int32)
    if spec.lines.enabled:
        survivors = np.nonzero(alive)[0]
        frequent = frequent_lines([texts[i] for i in survivors], spec.lines, progress=progress)
        emptied, headings_kept = [], 0
        for i in survivors:
            texts[i], lines_removed[i], headings = remove_lines(texts[i], frequent, spec.lines)
            headings_kept += headings
            if len(texts[i].strip()) < spec.lines.min_chars:
                emptied.append(i)
        remove(np.array(emptied, np.int64), "lines")
        stats["lines_frequent"] = len(frequent.boilerplate)
        stats["lines_removed"] = int(lines_removed.sum())
        stats["lines_headings_kept"] = headings_kept  # lines that recur but were kept as section headings
        stats["lines_top"] = frequent.boilerplate.most_common(spec.lines.report_top)
        stats["lines_headings_top"] = frequent.headings.most_common(spec.lines.report_top)

    # Clusters across levels: a removed document belongs to the cluster of the document finally kept.
    root = np.where(dup_of >= 0, dup_of, np.arange(n))
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    member = alive | np.isin(level, [LEVELS.index(lv) for lv in ("url", "exact", "near")])
    size = np.bincount(root[member], minlength=n)
    sizes_kept = size[alive]
    stats["cluster_sizes"] = dict(sorted(Counter(sizes_kept.tolist()).items()))
    stats["kept"] = int(alive.sum())

    kept_rows = np.nonzero(alive)[0]
    kept = table.take(pa.array(kept_rows))
    kept = kept.set_column(kept.column_names.index("text"), "text", pa.array([texts[i] for i in kept_rows], pa.string()))
    kept = kept.append_column("lines_removed", pa.array(lines_removed[kept_rows], pa.int32()))
    kept = kept.append_column("duplicates", pa.array(sizes_kept - 1, pa.int32()))
    gone = np.nonzero(~alive)[0]
    removed = table.take(pa.array(gone, pa.int64()))
    removed = removed.append_column("level", pa.array([LEVELS[level[i]] for i in gone], pa.string()))
    removed = removed.append_column("duplicate_of", pa.array([ids[dup_of[i]] if dup_of[i] >= 0 else None for i in gone],
                                                             pa.string()))
    removed = removed.append_column("jaccard", pa.array([None if np.isnan(jac[i]) else float(jac[i]) for i in gone],
                                                        pa.float64()))
    assert kept.num_rows + removed.num_rows == n
    return DedupResult(kept=kept, removed=removed, stats=stats, signatures=sig, shingle_counts=sizes)
