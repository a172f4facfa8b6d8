"""Streaming readers for crawl input: WARC/WET, HTML files, JSONL and Parquet.

Every reader yields ``Record`` objects one at a time, so memory does not grow with the corpus. A
record that cannot be read (a truncated WARC record, a file that stops mid-way, an empty file) is
still yielded, with ``error`` set, so the filter counts it as rejected and nothing goes missing.
"""
from __future__ import annotations

import bz2
import gzip
import http.client
import io
import json
import lzma
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow.parquet as pq

from pipeline.errors import BadInput

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
FORMATS = {".warc": "warc", ".arc": "arc", ".wet": "warc", ".wat": "warc", ".html": "html", ".htm": "html", ".jsonl": "jsonl",
           ".json": "jsonl", ".parquet": "parquet"}
DOCUMENT_TYPES = ("response", "resource", "conversion")  # WARC record types that carry a page


@dataclass
class Record:
    """One input document, before any filtering."""

    source: str  # the configured source name
    file: str  # the file it came from
    record_id: str  # WARC-Record-ID, or the line / row number, or the file name
    url: Optional[str] = None
    date: Optional[str] = None  # fetch date (WARC-Date), as given
    html: Optional[bytes] = None  # raw HTML bytes, to be decoded and extracted
    text: Optional[str] = None  # text already extracted (WET, JSONL/Parquet text field)
    charset: Optional[str] = None  # charset the HTTP header or the record declares
    content_type: Optional[str] = None
    error: Optional[str] = None  # why the record could not be read; it is rejected with this reason
    error_detail: str = ""


def compression_suffix(path: str) -> str:
    for ext in OPENERS:
        if path.lower().endswith(ext):
            return ext
    return ""


def file_format(path: str) -> Optional[str]:
    name = path.lower()
    name = name[: len(name) - len(compression_suffix(name))]
    return FORMATS.get(os.path.splitext(name)[1])


def open_binary(path: str):
    opener = OPENERS.get(compression_suffix(path))
    return opener(path, "rb") if opener else open(path, "rb")


def _media_type(value: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """``text/html; charset=UTF-8`` -> ("text/html", "utf-8")."""
    if not value:
        return None, None
    parts = [p.strip() for p in value.split(";")]
    charset = next((p.split("=", 1)[1].strip("\"' ").lower() for p in parts[1:] if p.lower().startswith("charset=")),
                   None)
    return parts[0].lower() or None, charset


def _dechunk(body: bytes) -> bytes:
    """Undo HTTP chunked transfer encoding; raises ValueError on a malformed body."""
    out, pos = bytearray(), 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


def _http_payload(block: bytes) -> tuple[bytes, Optional[str], Optional[str], str]:
    """Split an HTTP response block into (body, media type, charset, status); ValueError if malformed."""
    head, sep, body = block.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = block.partition(b"\n\n")
    if not sep:
        raise ValueError("no end of HTTP headers")
    status, _, rest = head.partition(b"\n")
    if not status.startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP response: {status[:40]!r}")
    headers = http.client.parse_headers(io.BytesIO(rest + b"\r\n\r\n"))
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        body = _dechunk(body)
    encoding = (headers.get("Content-Encoding") or "").lower()
    if encoding in ("gzip", "x-gzip") and body[:2] == b"\x1f\x8b":  # some crawls store it decoded anyway
        body = gzip.decompress(body)
    media, charset = _media_type(headers.get("Content-Type"))
    return body, media, charset, status.decode("latin-1").strip()


def read_warc(source: str, path: str) -> Iterator[Record]:
    """Response/resource records as HTML (or text), conversion records (WET) as text."""
    from fastwarc.warc import ArchiveIterator

    n = 0
    record = None
    try:
        with open_binary(path) as fh:
            for warc in ArchiveIterator(fh, parse_http=False):
                kind = warc.headers.get("WARC-Type")
                if kind not in DOCUMENT_TYPES:
                    continue
                n += 1
                record = Record(source, path, warc.headers.get("WARC-Record-ID") or f"#{n}",
                                url=(warc.headers.get("WARC-Target-URI") or "").strip("<>") or None,
                                date=warc.headers.get("WARC-Date"))
                block = warc.reader.read()
                if len(block) < warc.content_length:
                    yield _failed(record, "truncated", f"{len(block)} of {warc.content_length} bytes")
                    record = None
                    continue
                media, charset = _media_type(warc.headers.get("Content-Type"))
                if kind == "response" and media == "application/http":
                    try:
                        block, media, charset, _ = _http_payload(block)
                    except (ValueError, OSError, EOFError) as e:
                        yield _failed(record, "bad_http", str(e))
                        record = None
                        continue
                record.content_type, record.charset = media, charset
                if kind == "conversion" or media == "text/plain":
                    record.html, record.text = None, None
                    try:
                        record.text = block.decode(charset or "utf-8")
                    except (UnicodeDecodeError, LookupError) as e:
                        record.html = block  # decoded like a page, with detection
                        record.error_detail = str(e)
                else:
                    record.html = block
                yield record
                record = None
    except (OSError, EOFError, ValueError) as e:
        # The file stops or breaks here: the record being read (if any) is the casualty; what
        # came before was already yielded. The file's remainder cannot be located, so it is lost
        # to this run and the rejection says so.
        broken = record or Record(source, path, f"#{n + 1}")
        yield _failed(broken, "truncated" if isinstance(e, EOFError) else "corrupt",
                      f"{type(e).__name__}: {e}; the rest of the file is unreadable")
    if n == 0 and record is None and os.path.getsize(path) == 0:
        yield _failed(Record(source, path, "#0"), "empty_file", "0 bytes")


def _failed(record: Record, reason: str, detail: str) -> Record:
    record.error, record.error_detail = reason, detail
    return record


def read_html(source: str, path: str, name: str, url: Optional[str] = None) -> Iterator[Record]:
    record = Record(source, path, name, url=url, content_type="text/html")
    try:
        with open_binary(path) as fh:
            record.html = fh.read()
    except (OSError, EOFError) as e:
        yield _failed(record, "corrupt", f"{type(e).__name__}: {e}")
        return
    yield _failed(record, "empty_file", "0 bytes") if not record.html.strip() else record


def read_jsonl(source: str, path: str, text_field: str, html_field: str, url_field: str,
               date_field: str) -> Iterator[Record]:
    lineno = 0
    try:
        with open_binary(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = Record(source, path, f"line {lineno}")
                try:
                    data = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield _failed(record, "bad_json", str(e))
                    continue
                if not isinstance(data, dict):
                    yield _failed(record, "bad_json", f"a {type(data).__name__}, not an object")
                    continue
                yield _from_fields(record, data, text_field, html_field, url_field, date_field)
    except (OSError, EOFError) as e:
        yield _failed(Record(source, path, f"line {lineno + 1}"), "truncated" if isinstance(e, EOFError) else "corrupt",
                      f"{type(e).__name__}: {e}; the rest of the file is unreadable")
        return
    if lineno == 0:
        yield _failed(Record(source, path, "line 0"), "empty_file", "no records")


def _from_fields(record: Record, data: dict, text_field: str, html_field: str, url_field: str,
                 date_field: str) -> Record:
    record.url = data.get(url_field) if isinstance(data.get(url_field), str) else None
    record.date = str(data[date_field]) if data.get(date_field) is not None else None
    text, html = data.get(text_field), data.get(html_field)
    if isinstance(text, str):
        record.text = text
    elif isinstance(html, (str, bytes)):
        record.html = html.encode("utf-8") if isinstance(html, str) else html
        record.charset = "utf-8" if isinstance(html, str) else None
    else:
        return _failed(record, "no_text_field", f"neither '{text_field}' nor '{html_field}' holds text")
    return record


def read_parquet(source: str, path: str, text_field: str, html_field: str, url_field: str,
                 date_field: str) -> Iterator[Record]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise BadInput(f"source '{source}': {path} is not a readable Parquet file ({e})") from None
    wanted = [c for c in (text_field, html_field, url_field, date_field) if c in pf.schema_arrow.names]
    if text_field not in wanted and html_field not in wanted:
        raise BadInput(f"source '{source}': {path} has neither a '{text_field}' nor an '{html_field}' column "
                       f"(columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=1000, columns=wanted):
        for data in batch.to_pylist():
            yield _from_fields(Record(source, path, f"row {row}"), data, text_field, html_field, url_field, date_field)
            row += 1
    if row == 0:
        yield _failed(Record(source, path, "row 0"), "empty_file", "no rows")
