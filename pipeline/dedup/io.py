"""Reading documents for dedup (Parquet or JSON lines) and writing its Parquet shards."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.errors import BadInput


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


def write_shards(table: pa.Table, directory: Path, rows_per_shard: int) -> list[str]:
    """part-NNNNN.parquet files of at most rows_per_shard rows (one, possibly empty, at least)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        name = f"part-{k:05d}.parquet"
        pq.write_table(table.slice(start, rows_per_shard), directory / name)
        names.append(name)
    return names
