"""Reading documents for dedup (Parquet or JSON lines) and writing its Parquet shards."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.data.sources import StageOrPath, resolve_files
from pipeline.dedup.evaluate import EvalSpec
from pipeline.errors import BadInput

DOCUMENT_FILES = (".parquet", ".jsonl", ".jsonl.gz", ".json", ".json.gz")


def read_documents(files: Sequence[str], label: str) -> pa.Table:
    """One table from Parquet and/or JSONL(.gz) files; each must have a string `text` column."""
    tables = []
    for f in files:
        try:
            if ".parquet" in Path(f).name:
                t = pq.read_table(f)
            else:
                t = pajson.read_json(pa.input_stream(f, compression="detect"))
        except (pa.ArrowInvalid, OSError) as e:
            raise BadInput(f"{label}: cannot read {f}: {str(e).splitlines()[0]}") from None
        if "text" not in t.column_names or not (pa.types.is_string(t.schema.field("text").type)
                                                or pa.types.is_large_string(t.schema.field("text").type)
                                                or pa.types.is_null(t.schema.field("text").type)):
            raise BadInput(f"{label}: {f} has no string column 'text' (columns: {', '.join(t.column_names)})")
        tables.append(t)
    if not tables:
        raise BadInput(f"{label}: no input files")
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as e:
        raise BadInput(f"{label}: the files' columns do not agree: {str(e).splitlines()[0]}") from None


def read_stage_documents(stage: str, stage_dir: Path, part: str = "kept") -> tuple[pa.Table, str]:
    """(documents, label) from a stage's ``<part>/*.parquet`` (kept, or the filter's rejected)."""
    directory = Path(stage_dir) / part
    label = f"the {stage} stage's {part} documents ({directory})"
    files = resolve_files(stage, str(directory), accept=lambda p: p.endswith(".parquet"), label=label)
    return read_documents(files, label), label


@dataclass
class Input:
    """The documents to deduplicate, where they come from (for messages), and the upstream stage's output."""

    table: pa.Table
    label: str
    source: StageOrPath
    stage_dir: Optional[Path] = None


def read_input(source: StageOrPath, stage_dirs: Mapping[str, Path], key: str = "dedup.input") -> Input:
    """The kept shards of ``source.stage`` (its output directory in ``stage_dirs``) or the Parquet/JSONL
    files of ``source.path``; ``key`` names the setting in error messages."""
    if source.stage:
        stage_dir = stage_dirs[source.stage]
        return Input(*read_stage_documents(source.stage, stage_dir), source, stage_dir)
    label = f"{key}.path"
    files = resolve_files(key, source.path, accept=lambda p: p.endswith(DOCUMENT_FILES), label=label)
    return Input(read_documents(files, label), label, source)


def nonblank_texts(table: pa.Table) -> list[str]:
    return [t for t in table.column("text").to_pylist() if t and t.strip()]


def eval_texts(docs: Input, spec: EvalSpec) -> list[str]:
    """The near-duplicate evaluation's corpus: the input's texts, plus the pages the filter rejected (they
    have text) when ``spec.include_filter_rejected`` and the input is the filter stage's output."""
    texts = nonblank_texts(docs.table)
    if spec.include_filter_rejected and docs.source.stage == "filter":
        rejected, _ = read_stage_documents("filter", docs.stage_dir, "rejected")
        texts += nonblank_texts(rejected)
    return texts


def write_shards(table: pa.Table, directory: Path, rows_per_shard: int) -> list[str]:
    """part-NNNNN.parquet files of at most rows_per_shard rows (one, possibly empty, at least)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        name = f"part-{k:05d}.parquet"
        pq.write_table(table.slice(start, rows_per_shard), directory / name)
        names.append(name)
    return names


def write_parts(parts: dict[str, pa.Table], out_dir: Path, rows_per_shard: int) -> dict[str, list[str]]:
    """Each table as shards in ``out_dir/<part>/``; the files relative to ``out_dir``, per part."""
    return {part: [f"{part}/{name}" for name in write_shards(table, Path(out_dir) / part, rows_per_shard)]
            for part, table in parts.items()}
