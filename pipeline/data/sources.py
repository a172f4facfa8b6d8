"""Text sources: local JSONL/Parquet/text files (or an upstream stage's Parquet) read with datasets."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import fsspec
import numpy as np

from pipeline.errors import BadInput, ConfigError, choice

if TYPE_CHECKING:
    import datasets

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
           ".md": "text", ".rst": "text"}
COMPRESSION = (".gz", ".bz2", ".xz")


class SampleBy(StrEnum):
    """How a text file splits into documents."""

    line = "line"
    paragraph = "paragraph"
    document = "document"  # the whole file


@dataclass
class StageOrPath:
    """An input: an upstream stage's output, or files (a file, a directory or a glob) of one's own."""

    stage: Optional[str] = None
    path: Optional[str] = None

    def __post_init__(self):
        if (self.stage is None) == (self.path is None):
            hint = " (stage has a default: set it to null to give a path)" if self.stage else ""
            raise ConfigError("", f"sets {'both' if self.stage else 'neither'} of 'stage' and 'path'; set exactly one "
                                  f"('stage: <upstream stage>' or 'path: <your files>'){hint}")

    def located(self, stage_dirs: Mapping[str, Path], key: str) -> tuple[Path, str]:
        """The directory or files this input names (a stage's output directory in ``stage_dirs``), and the full
        key that names it (``key`` is this input's own, e.g. ``cpt.init``), for error messages."""
        if self.stage is not None:
            return Path(stage_dirs[self.stage]), f"{key}.stage"
        return Path(self.path).resolve(), f"{key}.path"


@dataclass
class SourceSpec(StageOrPath):
    """One named text source: ``stage`` reads an upstream stage's kept documents (kept/*.parquet)."""

    format: Optional[str] = None  # json | parquet | text; None: from the file extension
    text_field: str = "text"  # JSONL/Parquet field holding the document text
    sample_by: SampleBy = SampleBy.document  # text files: one document per line, paragraph or file
    max_documents: Optional[int] = None  # keep only the first N documents
    max_document_chars: Optional[int] = None  # split longer documents at line breaks into pieces this long
    license: Optional[str] = None  # the files' licence, for the dataset card (a stage's output carries its own)

    def __post_init__(self):
        super().__post_init__()
        self.sample_by = choice(SampleBy, self.sample_by, "sample_by")


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into consecutive pieces of at most ``max_chars``, at line breaks where there are any.

    Joining the pieces gives the text back; a line longer than ``max_chars`` is cut inside.
    """
    assert max_chars > 0, max_chars
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind("\n", start, start + max_chars)
        end = cut + 1 if cut >= start else start + max_chars
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _stem_suffix(path: str) -> str:
    name = path.lower()
    for ext in COMPRESSION:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return os.path.splitext(name)[1]


def resolve_files(name: str, pattern: str, accept: Optional[Callable[[str], bool]] = None,
                  label: Optional[str] = None) -> list[str]:
    """Expand a file, directory or glob into a sorted list of readable files.

    ``accept`` picks the files of a directory (default: the text formats this module reads);
    ``label`` starts the error messages (default: ``source '<name>'``).
    """
    where = label or f"source '{name}'"
    accept = accept or (lambda path: _stem_suffix(path) in FORMATS)
    if os.path.isdir(pattern):
        files = [str(p) for p in sorted(Path(pattern).rglob("*")) if p.is_file() and accept(str(p))]
    elif glob.has_magic(pattern):
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    elif os.path.isfile(pattern):
        files = [pattern]
    else:
        raise BadInput(f"{where}: {pattern} does not exist")
    if not files:
        raise BadInput(f"{where}: no files match {pattern}")
    for f in files:
        if not os.access(f, os.R_OK):
            raise BadInput(f"{where}: {f} is not readable")
    return files


def infer_format(name: str, files: list[str]) -> str:
    found = {FORMATS.get(_stem_suffix(f)) for f in files}
    if None in found:
        bad = next(f for f in files if _stem_suffix(f) not in FORMATS)
        raise BadInput(f"source '{name}': cannot tell the format of {bad}; set its 'format' to json, parquet or text")
    if len(found) > 1:
        raise BadInput(f"source '{name}': files mix formats {sorted(found)}; split them into separate sources")
    return found.pop()


def _open(path: str):
    return fsspec.open(path, "rt", compression="infer", encoding="utf-8").open()


def find_bad_json_record(files: list[str], text_field: str) -> Optional[str]:
    """Name the first record that datasets could not load: invalid JSON or a non-string text."""
    for path in files:
        try:
            with _open(path) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"{path}: line {lineno}: invalid JSON ({e.msg})"
                    value = record.get(text_field) if isinstance(record, dict) else None
                    if not isinstance(record, dict):
                        return f"{path}: line {lineno}: a record must be a JSON object"
                    if value is not None and not isinstance(value, str):
                        return f"{path}: line {lineno}: field '{text_field}' is {type(value).__name__}, not a string"
        except UnicodeDecodeError as e:
            return f"{path}: not UTF-8 ({e.reason} at byte {e.start})"
        except (OSError, EOFError) as e:
            return f"{path}: cannot be read ({e})"
    return None


def load_source(name: str, spec: SourceSpec, cache_dir: str) -> datasets.Dataset:
    """Load one source as a Dataset with a single string column ``text``."""
    import datasets  # here, not at the top: the config reads SourceSpec, and datasets takes seconds to import

    assert spec.path is not None, f"source '{name}': an upstream stage's documents are read by their path"
    files = resolve_files(name, spec.path)
    fmt = spec.format or infer_format(name, files)
    kwargs = {"sample_by": spec.sample_by} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # datasets wraps parse errors deep inside; find the record ourselves
        where = find_bad_json_record(files, spec.text_field) if fmt == "json" else None
        raise BadInput(f"source '{name}': {where or f'cannot read {spec.path} as {fmt}: {str(e).splitlines()[0]}'}") from e
    field = "text" if fmt == "text" else spec.text_field
    if field not in ds.column_names:
        raise BadInput(f"source '{name}': {spec.path} has no field '{field}' (fields: {', '.join(ds.column_names)}); "
                       f"set its text_field")
    feature = ds.features[field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        where = find_bad_json_record(files, field) if fmt == "json" else None
        raise BadInput(f"source '{name}': {where or f'field {field!r} holds {feature}, not text'}")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if feature.dtype == "large_string":  # so sources of either string type concatenate
        ds = ds.cast_column("text", datasets.Value("string"))
    if spec.max_documents is not None:
        ds = ds.select(range(min(spec.max_documents, len(ds))))
    if spec.max_document_chars is not None:
        limit = spec.max_document_chars
        ds = ds.map(lambda b: {"text": [p for t in b["text"] for p in split_long(t or "", limit)]}, batched=True,
                    desc=f"Splitting {name} documents over {limit} characters")
    return ds


def with_stage_paths(sources: Mapping[str, SourceSpec], stage_dirs: Mapping[str, Path]) -> dict[str, SourceSpec]:
    """``sources`` with each ``stage`` replaced by the path of that stage's kept documents (kept/*.parquet)."""
    return {name: replace(spec, path=str(Path(stage_dirs[spec.stage]) / "kept"), stage=None, format="parquet")
            if spec.stage is not None else spec for name, spec in sources.items()}


def load_documents(sources: Mapping[str, SourceSpec], cache_dir: str) -> datasets.Dataset:
    """All sources as one Dataset with columns ``text`` and ``source`` (an index into ``sources``)."""
    import datasets

    if not sources:
        raise BadInput("no sources configured: add one under tokenize.sources (see conf/experiment/demo.yaml)")
    parts = []
    for index, (name, spec) in enumerate(sources.items()):
        ds = load_source(name, spec, cache_dir)
        parts.append(ds.add_column("source", np.full(len(ds), index, dtype=np.int32)))
    return datasets.concatenate_datasets(parts)
