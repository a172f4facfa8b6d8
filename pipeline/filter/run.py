"""Run the filter over many files with a process pool; write kept and rejected Parquet shards.

Files are grouped into tasks of similar size; each task streams its files record by record and
writes ``kept/part-NNNNN.parquet`` and ``rejected/part-NNNNN.parquet``, so memory stays flat and
the output does not depend on ``num_proc``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from fnmatch import fnmatch
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.data.sources import resolve_files
from pipeline.data.workers import WorkerPool
from pipeline.errors import BadInput, check, choice
from pipeline.files import link_or_copy
from pipeline.filter.records import Record, file_format, read_html, read_jsonl, read_parquet, read_warc
from pipeline.filter.quality import C4_LINE_RULES
from pipeline.filter.steps import (STEPS, Doc, Drop, Step, StepsSpec, Thresholds, after_scoring_steps, build_steps,
                                   first_drop, metric_names)

FLUSH_ROWS = 500
SAMPLE_CHARS = 2000
SCORES = "scores"
KEY_FILE = "KEY"  # in scores/: the scoring key the shards were made with
PII_FILE = "PII.json"  # in scores/: the PII settings the kept rows were redacted with
PII_COLUMNS = ("pii_email", "pii_ip_address", "pii_phone")
REPORTING_CODE = ("inspect.py", "plots.py", "report.py")  # pipeline/filter/ modules the scores do not depend on
SCORING_PACKAGES = ("resiliparse", "trafilatura", "py3langid")
UNSCORED = "unscored"  # rejected/unscored-NNNNN.parquet: documents rejected before the quality rules
RETHRESHOLD_ROWS_PER_PROCESS = 20_000  # on the demo, 480 scored documents take 0.3 s in-process; a pool adds 0.4 s
SCORE_COLUMNS = ("id", "url", "source", "file", "record_id", "date", "lang", "lang_score", "metrics")


class Format(StrEnum):
    warc = "warc"  # WARC or WET
    html = "html"
    jsonl = "jsonl"
    parquet = "parquet"


@dataclass
class CrawlSource:
    """One named crawl input: WARC/WET, HTML files, or JSONL/Parquet with a text or html field."""

    path: str  # a file, a directory (searched recursively) or a glob
    format: Optional[Format] = None  # None: from each file's extension
    text_field: str = "text"  # JSONL/Parquet: field with extracted text ...
    html_field: str = "html"  # ... or with raw HTML (used when the text field is absent)
    url_field: str = "url"
    date_field: str = "date"
    url_index: Optional[str] = None  # HTML files: a JSONL of {"path": relative to the index's folder, "url": ...}
    exclude: List[str] = field(default_factory=list)  # glob patterns of paths to leave out
    max_files: Optional[int] = None  # only the first N files (sorted), for quick runs
    license: Optional[str] = None  # the source's licence, for the dataset card (an SPDX id or a short phrase)

    def __post_init__(self):
        if self.format is not None:
            self.format = choice(Format, self.format, "format")
        check(self.max_files is None or self.max_files >= 0, "max_files", self.max_files, "at least 0 or null")


@dataclass
class InputFile:
    source: str
    path: str
    format: str
    url: Optional[str]
    size: int
    rel: str  # path relative to the source's base folder: part of each document's id


def _base_dir(pattern: str) -> str:
    """The folder a file, directory or glob pattern starts from."""
    if os.path.isdir(pattern):
        return pattern
    magic = next((i for i, c in enumerate(pattern) if c in "*?["), None)
    return os.path.dirname(pattern if magic is None else pattern[:magic])


def resolve_inputs(sources: Dict[str, CrawlSource]) -> List[InputFile]:
    """Every input file, checked up front: a missing or unreadable path fails here, naming it."""
    if not sources:
        raise BadInput("filter.sources is empty: add a source (see conf/experiment/demo.yaml)")
    files: List[InputFile] = []
    for name, spec in sources.items():
        found = resolve_files(name, spec.path, accept=lambda p: file_format(p) is not None,
                              label=f"filter.sources.{name}")
        found = [f for f in found if not any(fnmatch(f, pattern) for pattern in spec.exclude)]
        if not found:
            raise BadInput(f"filter.sources.{name}: no files match {spec.path}")
        urls = _url_index(name, spec.url_index) if spec.url_index else {}
        for path in found[: spec.max_files]:
            fmt = spec.format or file_format(path)
            if fmt == "arc":
                raise BadInput(f"filter.sources.{name}: {path} is a legacy ARC file; convert it to WARC first")
            if fmt not in ("warc", "html", "jsonl", "parquet"):
                raise BadInput(f"filter.sources.{name}: cannot tell the format of {path}; set format: "
                               f"warc, html, jsonl or parquet")
            files.append(InputFile(name, path, fmt, urls.get(_real(path)), os.path.getsize(path),
                                   os.path.relpath(path, _base_dir(spec.path))))
    return files


@functools.lru_cache(maxsize=4096)
def _real_dir(directory: str) -> str:
    return os.path.realpath(directory)


def _real(path: str) -> str:
    """``path`` with its folder's symlinks resolved (one realpath per folder, not per file: 2,500 cost 0.3 s)."""
    return os.path.join(_real_dir(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def _url_index(name: str, index: str) -> Dict[str, str]:
    try:
        base = os.path.dirname(index)
        out = {}
        with open(index, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadInput(f"filter.sources.{name}.url_index: {index}: line {lineno}: invalid JSON ({e.msg})")
                if entry.get("url") and entry.get("path"):
                    out[_real(os.path.join(base, entry["path"]))] = entry["url"]
        return out
    except OSError as e:
        raise BadInput(f"filter.sources.{name}.url_index: {index} cannot be read ({e})") from None


def plan_tasks(files: List[InputFile], num_proc: int) -> List[List[InputFile]]:
    """Consecutive files grouped into tasks of about equal bytes, several per process for balance."""
    total = sum(f.size for f in files)
    target = max(total / max(4 * num_proc, 1), 1)
    tasks, current, size = [], [], 0
    for f in files:
        current.append(f)
        size += f.size
        if size >= target:
            tasks.append(current)
            current, size = [], 0
    if current:
        tasks.append(current)
    return tasks


def read_file(f: InputFile, spec: CrawlSource, max_bytes: Optional[int] = None) -> Iterator[Record]:
    if f.format == "warc":
        return read_warc(f.source, f.path, max_bytes)
    if f.format == "html":
        return read_html(f.source, f.path, f.rel, f.url, max_bytes)
    fields = (spec.text_field, spec.html_field, spec.url_field, spec.date_field)
    return (read_jsonl if f.format == "jsonl" else read_parquet)(f.source, f.path, *fields, max_bytes)


def doc_id(f: InputFile, record: Record) -> str:
    """Stable across runs and machines: the source, the file's path within it, the record's id."""
    return hashlib.sha1(f"{f.source}\0{f.rel}\0{record.record_id}".encode()).hexdigest()[:20]


def schemas(metric_names: List[str]) -> tuple[pa.Schema, pa.Schema, pa.Schema]:
    """(kept, rejected, scores): ``scores`` has a row for every document that reached the quality rules, in input
    order, with the page's text as extracted, every rule's value and the lines C4 keeps, so other thresholds can
    be applied later."""
    metrics = pa.struct([(m, pa.float64()) for m in metric_names]) if metric_names else pa.struct([])
    common = [("id", pa.string()), ("url", pa.string()), ("source", pa.string()), ("file", pa.string()),
              ("record_id", pa.string()), ("date", pa.string()), ("lang", pa.string()), ("lang_score", pa.float64()),
              ("text", pa.string())]
    kept = pa.schema([*common, ("metrics", metrics), ("pii_email", pa.int32()), ("pii_ip_address", pa.int32()),
                      ("pii_phone", pa.int32()), ("toxic_words", pa.int32()), ("toxic", pa.bool_())])
    rejected = pa.schema([*common, ("step", pa.string()), ("rule", pa.string()), ("value", pa.float64()),
                          ("limit", pa.float64()), ("detail", pa.string()), ("raw", pa.large_binary()),
                          ("metrics", metrics)])
    scores = pa.schema([*common, ("metrics", metrics), ("c4_lines", pa.list_(pa.int32())), ("toxic_words", pa.int32())])
    return kept, rejected, scores


class _ShardWriter:
    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.rows, self.writer = path, schema, [], None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _stats() -> dict:
    return {"input": Counter(), "kept": Counter(), "rejected": Counter(), "rules": defaultdict(Counter),
            "pii": Counter(), "toxic": Counter(), "c4_lines_removed": Counter(), "bytes_in": 0, "chars_kept": 0,
            "samples": defaultdict(list)}


class _Shard:
    """One task's shards and its statistics; every row is counted here, however it was made.

    Rejections are written to two files: ``rejected/unscored-NNNNN`` (read, urls, extract and langid
    rejections, which no threshold of the quality rules can change) and ``rejected/part-NNNNN`` (the
    quality rules' and toxicity's), so a run that only changes thresholds links the first and rewrites
    the second.
    """

    def __init__(self, out: Path, index: int, schemas: tuple, samples: int):
        self.kept = _ShardWriter(out / "kept" / f"part-{index:05d}.parquet", schemas[0])
        self.rejected = _ShardWriter(out / "rejected" / f"part-{index:05d}.parquet", schemas[1])
        self.unscored = _ShardWriter(out / "rejected" / f"{UNSCORED}-{index:05d}.parquet", schemas[1])
        self.scores = _ShardWriter(out / SCORES / f"part-{index:05d}.parquet", schemas[2])
        self.samples, self.stats = samples, _stats()

    def add(self, source: str, row: dict, scored: bool, write: bool = True) -> None:
        s = self.stats
        s["input"][source] += 1
        if scored:
            s["c4_lines_removed"].update({rule: int(row["metrics"].get(f"c4_lines_removed_{rule}") or 0)
                                          for rule in C4_LINE_RULES})
        if "rule" not in row:
            s["kept"][source] += 1
            s["chars_kept"] += len(row["text"])
            s["pii"].update({kind: row[f"pii_{kind}"] for kind in ("email", "ip_address", "phone")
                             if row[f"pii_{kind}"]})
            s["toxic"][source] += int(row["toxic"])
            if write:
                self.kept.add(row)
            return
        s["rejected"][source] += 1
        s["rules"][row["rule"]][source] += 1
        if len(s["samples"][row["rule"]]) < self.samples:
            sample = {k: row[k] for k in ("id", "url", "source", "file", "record_id", "rule", "value", "limit",
                                          "detail", "lang", "lang_score")}
            sample["text"] = (row["text"] or "")[:SAMPLE_CHARS]
            s["samples"][row["rule"]].append(sample)
        if write:
            (self.rejected if scored else self.unscored).add(row)

    def close(self) -> dict:
        for writer in (self.kept, self.rejected, self.unscored, self.scores):
            if writer is not None:
                writer.close()
        return self.stats


# The run's steps (built once, before the workers fork) and settings, read by run_task.
_STATE: dict = {}


def _row(doc: Doc, drop: Optional[Drop], doc_id: str) -> dict:
    r = doc.record
    row = {"id": doc_id, "url": r.url, "source": r.source, "file": r.file, "record_id": r.record_id,
           "date": r.date, "lang": doc.lang, "lang_score": doc.lang_score, "metrics": doc.metrics or None}
    if drop is None:
        row.update(text=doc.kept_text, pii_email=doc.pii.get("email", 0), pii_ip_address=doc.pii.get("ip_address", 0),
                   pii_phone=doc.pii.get("phone", 0), toxic_words=doc.toxic_words, toxic=doc.toxic)
    else:  # the text as extracted, before C4 removed lines: what the rules judged
        row.update(text=doc.text, step=drop.step, rule=drop.rule,
                   value=None if drop.value is None else float(drop.value),
                   limit=None if drop.limit is None else float(drop.limit), detail=drop.detail[:2000],
                   raw=r.html if doc.text is None else None)
    return row


def run_task(args: tuple[int, List[InputFile]]) -> dict:
    """Filter one task's files; write its kept, rejected and scores shards; return its counts and samples."""
    index, files = args
    steps: List[Step] = _STATE["steps"]
    shard = _Shard(_STATE["out_dir"], index, _STATE["schemas"], _STATE["samples"])
    for f in files:
        shard.stats["bytes_in"] += f.size
        for record in read_file(f, _STATE["sources"][f.source], _STATE["max_bytes"]):
            doc = Doc(record)
            drop = first_drop(steps, doc)
            row = _row(doc, drop, doc_id(f, record))
            shard.add(f.source, row, doc.scored)
            if doc.scored:
                shard.scores.add({**{k: row[k] for k in SCORE_COLUMNS}, "text": doc.text, "c4_lines": doc.c4_lines,
                                  "toxic_words": doc.toxic_words})
    return shard.close()


def rethreshold_task(args: tuple[int, List[InputFile]]) -> dict:
    """One task again from stored scores: the unscored rejections are linked and counted, the scored judged anew."""
    index, files = args
    previous, out = _STATE["previous"], _STATE["out_dir"]
    shard = _Shard(out, index, _STATE["schemas"], _STATE["samples"])
    shard.unscored = shard.scores = None  # linked below, not rewritten
    shard.stats["bytes_in"] = sum(f.size for f in files)
    unscored = Path("rejected") / f"{UNSCORED}-{index:05d}.parquet"
    columns = [c for c in _STATE["schemas"][1].names if c not in ("raw", "metrics")]
    for row in pq.read_table(previous / unscored, columns=columns).to_pylist():
        shard.add(row["source"], row, scored=False, write=False)
    thresholds, *redact = _STATE["steps"]
    # A document kept before and now, under the same PII settings, keeps its redacted text: no regex runs again.
    redacted = {} if not _STATE["same_pii"] else {
        row["id"]: row for row in pq.read_table(previous / "kept" / f"part-{index:05d}.parquet",
                                                columns=["id", "text", *PII_COLUMNS]).to_pylist()}
    scores = Path(SCORES) / f"part-{index:05d}.parquet"
    for batch in pq.ParquetFile(previous / scores).iter_batches(batch_size=FLUSH_ROWS):
        for s in batch.to_pylist():
            record = Record(s["source"], s["file"], s["record_id"], url=s["url"], date=s["date"])
            doc = Doc(record, text=s["text"], lang=s["lang"], lang_score=s["lang_score"], scored=True,
                      metrics=s["metrics"], c4_lines=s["c4_lines"], toxic_words=s["toxic_words"])
            drop = thresholds(doc)
            if drop is None and (old := redacted.get(s["id"])) is not None:
                doc.redacted = old["text"]
                doc.pii = {column[4:]: old[column] for column in PII_COLUMNS if old[column]}
            elif drop is None:
                drop = first_drop(redact, doc)
            shard.add(s["source"], _row(doc, drop, s["id"]), scored=True)
    stats = shard.close()
    for path in (unscored, scores):
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(previous / path, out / path)
    return stats


def scores_key(scoring: dict, files: List[InputFile]) -> str:
    """What stored scores depend on: the settings that are not thresholds (``scoring``, with the contents of the
    word lists), every input file's path, size and modification time, the filter's code and the versions of
    the packages that extract text and identify languages."""
    code = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(__file__).parent.glob("*.py"))
            if p.name not in REPORTING_CODE}
    inputs = [(f.source, f.rel, f.size, os.stat(f.path).st_mtime_ns) for f in files]
    blob = json.dumps({"scoring": scoring, "inputs": inputs, "code": code, "packages": _versions(SCORING_PACKAGES)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def _versions(packages: tuple[str, ...]) -> dict:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def stored_scores(previous: Optional[Path], key: str, tasks: int) -> tuple[Optional[Path], Optional[str]]:
    """(``previous``, None) if it holds scores made with ``key`` (same scoring settings, inputs and code) for each
    of ``tasks`` tasks; (None, why) if it should but a shard is missing or unreadable; (None, None) otherwise."""
    try:
        if previous is None or (previous / SCORES / KEY_FILE).read_text().strip() != key:
            return None, None
    except OSError:
        return None, None
    for index in range(tasks):
        for path in (previous / SCORES / f"part-{index:05d}.parquet",
                     previous / "rejected" / f"{UNSCORED}-{index:05d}.parquet"):
            try:
                pq.read_metadata(path)
            except (OSError, pa.ArrowException) as e:
                return None, f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return previous, None


def run_filter(sources: Dict[str, CrawlSource], steps: StepsSpec, out_dir: Path, num_proc: int,
               samples_per_rule: int, scoring: Optional[dict] = None, previous: Optional[Path] = None) -> dict:
    """Filter every source into ``out_dir``/kept and ``out_dir``/rejected; return merged statistics.

    ``out_dir``/scores keeps every document's scores. ``scoring``: the settings the scores depend on
    (everything but the thresholds), stored as a key beside them; when ``previous`` (an earlier output)
    holds scores with the same key and the same input files, only the thresholds are applied again:
    nothing is read or extracted.
    """
    files = resolve_inputs(sources)
    tasks = list(enumerate(plan_tasks(files, num_proc)))
    key = scores_key(scoring or {}, files)
    previous, unusable = stored_scores(previous, key, len(tasks))
    if previous is not None:
        built = after_scoring_steps(steps)
        metric_fields = [f.name for f in pq.read_schema(previous / SCORES / "part-00000.parquet").field("metrics").type]
        missing = sorted({r.metric for s in built if isinstance(s, Thresholds) for r in s.rules} - set(metric_fields))
        if missing:  # cannot happen while the key covers what is measured; a full run is the safe answer
            previous, unusable = None, f"no stored values of {', '.join(missing)}"
    processes = num_proc
    if previous is not None:
        task_fn, desc = rethreshold_task, "Re-thresholding"
        # Judging stored scores is light: worker processes pay for themselves only on many documents.
        rows = sum(pq.read_metadata(p).num_rows for p in (previous / SCORES).glob("part-*.parquet"))
        processes = min(num_proc, 1 + rows // RETHRESHOLD_ROWS_PER_PROCESS)
    else:
        built = build_steps(steps)  # here, once: a bad word list or a broken package fails before any work
        task_fn, desc = run_task, "Filtering"
        metric_fields = metric_names(built)
    pii = json.dumps(asdict(steps.pii), sort_keys=True) + "\n"
    same_pii = previous is not None and _read(previous / SCORES / PII_FILE) == pii
    # Forked workers inherit the built steps (the language model and word lists are loaded once).
    _STATE.update(same_pii=same_pii, steps=built, sources=sources, out_dir=Path(out_dir), samples=samples_per_rule, previous=previous,
                  schemas=schemas(metric_fields), max_bytes=steps.max_document_bytes, task=task_fn)
    results: Dict[int, dict] = {}
    bar = tqdm(total=len(files), desc=desc, unit="file")
    if processes <= 1 or len(tasks) == 1:
        for index, task in tasks:
            results[index] = task_fn((index, task))
            bar.update(len(task))
    else:
        with WorkerPool(min(processes, len(tasks))) as pool:
            sizes = {index: len(task) for index, task in tasks}
            done = pool.imap_unordered(_indexed, tasks)
            for index, stats in done:
                results[index] = stats
                bar.update(sizes[index])
    bar.close()
    (Path(out_dir) / SCORES).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / SCORES / KEY_FILE).write_text(key + "\n")
    (Path(out_dir) / SCORES / PII_FILE).write_text(pii)
    stats = merge([results[i] for i in sorted(results)], list(sources), samples_per_rule, files)
    stats["scores"] = {"key": key, "rethresholded_from": str(previous) if previous else None}
    if unusable:
        stats["scores"]["unusable"] = unusable
    return stats


def _indexed(args: tuple[int, List[InputFile]]) -> tuple[int, dict]:
    return args[0], _STATE["task"](args)


def merge(parts: List[dict], source_names: List[str], samples_per_rule: int, files: List[InputFile]) -> dict:
    """Task statistics summed in task order (so samples are the same whatever finished first)."""
    total = _stats()
    for p in parts:
        for key in ("input", "kept", "rejected", "pii", "toxic", "c4_lines_removed"):
            total[key].update(p[key])
        for rule, c in p["rules"].items():
            total["rules"][rule].update(c)
        total["bytes_in"] += p["bytes_in"]
        total["chars_kept"] += p["chars_kept"]
        for rule, samples in p["samples"].items():
            room = samples_per_rule - len(total["samples"][rule])
            total["samples"][rule] += samples[:max(room, 0)]
    per_source = {s: {"files": sum(1 for f in files if f.source == s), "input": total["input"][s],
                      "kept": total["kept"][s], "rejected": total["rejected"][s], "toxic_flagged": total["toxic"][s],
                      "rejected_by_rule": {r: c[s] for r, c in sorted(total["rules"].items()) if c[s]}}
                  for s in source_names}
    for s, c in per_source.items():
        if c["kept"] + c["rejected"] != c["input"]:
            raise AssertionError(f"source {s}: kept {c['kept']} + rejected {c['rejected']} != input {c['input']}")
    rules = {r: sum(c.values()) for r, c in total["rules"].items()}
    return {"per_source": per_source, "rules": dict(sorted(rules.items())), "pii": dict(total["pii"]),
            "c4_lines_removed": dict(total["c4_lines_removed"]),
            "bytes_in": total["bytes_in"], "chars_kept": total["chars_kept"], "samples": dict(total["samples"]),
            "funnel": funnel(sum(total["input"].values()), rules)}


def funnel(n_input: int, rules: Dict[str, int]) -> List[tuple[str, int]]:
    """Documents left after each step, in step order: [("input", N), ("read", ...), ...]."""
    left, out = n_input, [("input", n_input)]
    for step in STEPS:
        removed = sum(c for r, c in rules.items() if r.split(".", 1)[0] == step)
        left -= removed
        out.append((step, left))
    return out
