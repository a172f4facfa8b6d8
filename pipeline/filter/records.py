"""Streaming readers for crawl input: WARC/WET, HTML files, JSONL and Parquet.

Every reader yields ``Record`` objects one at a time, so memory does not grow with the corpus. A
record that cannot be read (a truncated WARC record, a file that stops mid-way, junk between
records, an empty file) is still yielded, with ``error`` set, so the filter counts it as rejected
and nothing goes missing; so is one larger than ``max_bytes``, unread ("too_large").
"""
from __future__ import annotations

import bisect
import bz2
import gzip
import http.client
import io
import json
import lzma
import os
import zlib
from array import array
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import BadInput

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
FORMATS = {".warc": "warc", ".arc": "arc", ".wet": "warc", ".wat": "warc", ".html": "html", ".htm": "html", ".jsonl": "jsonl",
           ".json": "jsonl", ".parquet": "parquet"}
DOCUMENT_TYPES = ("response", "resource", "conversion")  # WARC record types that carry a page
RAW_HEAD_BYTES = 65536  # of an oversized document or an unreadable stretch, kept in the rejected row


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


def read_warc(source: str, path: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    """Response/resource records as HTML (or text), conversion records (WET) as text.

    Every record that can be read is yielded. A gzipped WARC is read member by member: where its
    bytes stop being readable (junk appended, a corrupt member, the end of a cut file), the records
    before are all yielded, the unreadable stretch is one rejected record named by its byte offset,
    and reading goes on at the next member that begins a WARC record. A plain, bz2 or xz WARC
    stops at its first unreadable byte, which is one rejected record too.
    """
    n = 0
    if compression_suffix(path) != ".gz":
        with open_binary(path) as fh:
            stream = _Salvaged(fh)
            documents = _WarcDocuments(source, path, stream, max_bytes, n)
            yield from documents
        n = documents.n
        if stream.problem and not stream.claimed:
            yield _failed(Record(source, path, f"#{n + 1}"), "truncated" if stream.truncated else "corrupt",
                          f"{stream.problem} after {stream.bad_at:,} bytes of decompressed data; the rest of the file "
                          f"is unreadable")
        elif documents.error is not None:
            where = "at the start" if documents.last_at is None else \
                f"after the record that starts at byte {documents.last_at:,} (decompressed)"
            yield _failed(Record(source, path, f"#{n + 1}"), "corrupt",
                          f"not a WARC record ({documents.error}) {where}; the rest of the file is unreadable")
        elif n == 0 and os.path.getsize(path) == 0:
            yield _failed(Record(source, path, "#0"), "empty_file", "0 bytes")
        return

    size = os.path.getsize(path)
    if size == 0:
        yield _failed(Record(source, path, "#0"), "empty_file", "0 bytes")
        return
    with open(path, "rb") as fh:
        start: Optional[int] = 0
        while start is not None:
            stream = _GzipMembers(fh, start)
            documents = _WarcDocuments(source, path, stream, max_bytes, n, stream_detect=False)
            yield from documents
            n = documents.n
            if stream.problem:
                bad_at, problem = stream.bad_at, stream.problem
            elif documents.error is not None:  # readable gzip, but not WARC: skip the member it begins in
                bad_at, problem = stream.member_after(documents.last_at), f"not a WARC record ({documents.error})"
            else:
                return
            start = None if stream.truncated else _next_warc_member(fh, bad_at + 1)
            if stream.claimed or stream.in_bad_member(documents.last_document_at):
                continue  # a document was read from the bad member: it is the casualty, counted once, not the stretch
            length = (size if start is None else start) - bad_at
            fh.seek(bad_at)
            stretch = Record(source, path, f"offset {bad_at}", html=fh.read(min(length, RAW_HEAD_BYTES)))
            if stream.truncated:
                yield _failed(stretch, "truncated", f"the file ends {length:,} bytes into the gzip member that "
                                                    f"starts at byte {bad_at:,}")
            else:
                where = "to the end of the file" if start is None else f"up to the next record, at byte {start:,},"
                yield _failed(stretch, "corrupt", f"{length:,} bytes from byte {bad_at:,} {where} cannot be read "
                                                  f"({problem})")


class _WarcDocuments:
    """The document records fastwarc finds in one stream, as Records numbered on from ``n``.

    ``error`` is why fastwarc stopped early, if it did, and ``last_at`` where the last record it
    read began (``last_document_at``: the last document record). A document cut short because the
    stream stopped, or read whole from a gzip member cut before its checksum, ``claims`` the
    stream's problem: it is the one rejection, under its own id, and the stretch is not another.
    """

    def __init__(self, source: str, path: str, stream, max_bytes: Optional[int], n: int, stream_detect: bool = True):
        self.source, self.path, self.stream, self.max_bytes, self.n = source, path, stream, max_bytes, n
        self.stream_detect = stream_detect
        self.error: Optional[Exception] = None
        self.last_at: Optional[int] = None
        self.last_document_at: Optional[int] = None

    def __iter__(self) -> Iterator[Record]:
        from fastwarc.warc import ArchiveIterator

        records = iter(ArchiveIterator(self.stream, parse_http=False, stream_detect=self.stream_detect))
        while True:
            try:
                warc = next(records)
            except StopIteration:
                return
            except (OSError, ValueError) as e:  # not a WARC record here
                self.error = e
                return
            self.last_at = warc.stream_pos
            kind = warc.headers.get("WARC-Type")
            if kind in DOCUMENT_TYPES:
                self.n += 1
                self.last_document_at = warc.stream_pos
                yield self._record(warc, kind)

    def _record(self, warc, kind: str) -> Record:
        record = Record(self.source, self.path, warc.headers.get("WARC-Record-ID") or f"#{self.n}",
                        url=(warc.headers.get("WARC-Target-URI") or "").strip("<>") or None,
                        date=warc.headers.get("WARC-Date"))
        if self.max_bytes is not None and warc.content_length > self.max_bytes:
            record.html = warc.reader.read(RAW_HEAD_BYTES)  # the rest is skipped unread
            return _too_large(record, warc.content_length, self.max_bytes)
        block = warc.reader.read()
        if len(block) < warc.content_length:
            detail = f"{len(block)} of {warc.content_length} bytes"
            if self.stream.problem:
                self.stream.claimed = True
                detail += f"; {self.stream.describe()}"
            record.html = block
            return _failed(record, "truncated", detail)
        if self.stream.in_bad_member(warc.stream_pos):
            # read whole, but from a member cut before its checksum: unverified, so not kept as good
            self.stream.claimed = True
            record.html = block
            return _failed(record, "truncated", f"{len(block):,} bytes read, but {self.stream.describe()}, so "
                                                f"they cannot be verified (its checksum is cut off)")
        media, charset = _media_type(warc.headers.get("Content-Type"))
        if kind == "response" and media == "application/http":
            try:
                block, media, charset, _ = _http_payload(block)
            except (ValueError, OSError, EOFError) as e:
                record.html = block
                return _failed(record, "bad_http", str(e))
        record.content_type, record.charset = media, charset
        if kind == "conversion" or media == "text/plain":
            try:
                record.text = block.decode(charset or "utf-8")
            except (UnicodeDecodeError, LookupError) as e:
                record.html = block  # decoded like a page, with detection
                record.error_detail = str(e)
        else:
            record.html = block
        return record


GZIP_MAGIC = b"\x1f\x8b\x08"
_READ_BYTES = 1 << 20  # compressed bytes read at a time
_INFLATE_BYTES = 1 << 20  # most decompressed bytes made from them at a time
_HOLD_BYTES = 16 << 20  # a member's data is held back until its checksum is verified, up to this much


class _GzipMembers:
    """A gzip file's members decompressed one after another from offset ``start``, for fastwarc to read.

    It stops at the first byte that is not part of a readable member (junk, a corrupt member, the
    end of a file cut inside one) and says where: ``bad_at`` is the compressed offset at which that
    member or stretch begins, ``problem`` what is wrong. All data before it is delivered (gzip.open,
    behind a buffered reader, drops a whole read's data when a later member in it is bad, losing
    intact records without a word), and none of a corrupt member's (WARC writers give each record
    a member, so a record with a bad checksum is not read as good), up to _HOLD_BYTES a member.
    """

    def __init__(self, fh, start: int):
        fh.seek(start)
        self.fh = fh
        self.pos = start  # compressed offset of pending[0]
        self.pending = b""  # compressed bytes read, not yet inflated
        self.inflate = None  # the open member's decompressor; None between members
        self.member_at = start
        self.made = 0  # decompressed bytes made so far
        self.starts_made, self.starts_at = array("q"), array("q")  # each member's decompressed, compressed offset
        self.held = bytearray()  # the open member's data, passed on once its checksum is good
        self.buffer = bytearray()  # data to pass on
        self.delivered = 0
        self.done = False
        self.problem: Optional[str] = None
        self.bad_at: Optional[int] = None
        self.truncated = False  # the file ends inside a member
        self.claimed = False  # a record read when the data stopped carries the problem

    def read(self, size: int = -1) -> bytes:
        while not self.done and (size < 0 or len(self.buffer) < size):
            self._inflate_some()
        size = len(self.buffer) if size < 0 else min(size, len(self.buffer))
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.delivered += size
        return data

    def tell(self) -> int:  # fastwarc asks
        return self.delivered

    def _inflate_some(self) -> None:
        if not self.pending:
            self.pending = self.fh.read(_READ_BYTES)
            if not self.pending:
                if self.inflate is not None:
                    self.held += self.inflate.flush()
                    self.buffer += self.held  # a cut member: its record is rejected as truncated, under its own id,
                    # whether its data ends short or only the checksum is missing (_WarcDocuments._record)
                    if not self.inflate.eof:
                        self._stop("the file ends inside a gzip member", truncated=True)
                self.done = True
                return
        if self.inflate is None:
            data = self.pending.lstrip(b"\0")  # zeros may pad a gzip file after a member
            self.pos += len(self.pending) - len(data)
            self.pending = data
            if not data:
                return
            self.inflate, self.member_at = zlib.decompressobj(wbits=31), self.pos
            self.starts_made.append(self.made)
            self.starts_at.append(self.pos)
        try:
            data = self.inflate.decompress(self.pending, _INFLATE_BYTES)
        except zlib.error as e:  # its checksum too: what the member made so far is not passed on
            self.held.clear()
            self._stop(f"not gzip data: {e}")
            return
        self.held += data
        self.made += len(data)
        if self.inflate.eof:
            rest, self.inflate = self.inflate.unused_data, None
        else:
            rest = self.inflate.unconsumed_tail
        if self.inflate is None or len(self.held) > _HOLD_BYTES:
            self.buffer += self.held
            self.held.clear()
        self.pos += len(self.pending) - len(rest)
        self.pending = rest

    def _stop(self, problem: str, truncated: bool = False) -> None:
        self.problem, self.bad_at, self.truncated, self.done = problem, self.member_at, truncated, True

    def in_bad_member(self, decompressed: Optional[int]) -> bool:
        """Whether decompressed offset ``decompressed`` lies in the member that could not be read whole."""
        return self.problem is not None and decompressed is not None and decompressed >= self.starts_made[-1]

    def describe(self) -> str:
        if self.truncated:
            return f"the file ends inside the gzip member that starts at byte {self.bad_at:,}"
        return f"the gzip member at byte {self.bad_at:,} cannot be read ({self.problem})"

    def member_after(self, decompressed: Optional[int]) -> int:
        """The compressed offset of the first member that starts after decompressed offset ``decompressed``
        (None: the first member)."""
        k = 0 if decompressed is None else bisect.bisect_right(self.starts_made, decompressed)
        return self.starts_at[k] if k < len(self.starts_at) else self.pos


def _next_warc_member(fh, start: int) -> Optional[int]:
    """The offset of the first gzip member at or after ``start`` whose data begins a WARC record."""
    tail = b""
    pos = start
    while True:
        fh.seek(pos)
        chunk = fh.read(_READ_BYTES)
        if not chunk:
            return None
        block, base = tail + chunk, pos - len(tail)
        at = block.find(GZIP_MAGIC)
        while at >= 0:
            fh.seek(base + at)
            try:
                if zlib.decompressobj(wbits=31).decompress(fh.read(4096), 5) == b"WARC/":
                    return base + at
            except zlib.error:
                pass
            at = block.find(GZIP_MAGIC, at + 1)
        tail, pos = block[-(len(GZIP_MAGIC) - 1):], pos + len(chunk)


class _Salvaged:
    """A plain, bz2 or xz file read so that an error keeps what came before it; ``problem`` says what stopped it.

    (A buffered read that meets bad data partway drops everything it had read.) ``bad_at`` counts
    decompressed bytes.
    """

    def __init__(self, fh):
        self.fh = fh
        self.bad_at = 0
        self.done = False
        self.problem: Optional[str] = None
        self.truncated = False
        self.claimed = False

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while not self.done and (size < 0 or len(out) < size):
            try:
                chunk = self.fh.read1(_READ_BYTES if size < 0 else size - len(out))
            except (OSError, EOFError, ValueError) as e:
                self.problem, self.truncated, self.done = f"{type(e).__name__}: {e}", isinstance(e, EOFError), True
                break
            if not chunk:
                self.done = True
            out += chunk
        self.bad_at += len(out)
        return bytes(out)

    def tell(self) -> int:  # fastwarc asks
        return self.bad_at

    def in_bad_member(self, decompressed: Optional[int]) -> bool:  # no members here: the rest is one stretch
        return False

    def describe(self) -> str:
        return f"{self.problem} after {self.bad_at:,} bytes of decompressed data"


def _too_large(record: Record, size: int, limit: int) -> Record:
    """Rejected unread, so one huge page costs no time or memory; ``html`` keeps at most its first bytes."""
    return _failed(record, "too_large", f"{size:,} bytes, more than filter.max_document_bytes = {limit:,}; "
                                        f"the rejected row keeps the first {RAW_HEAD_BYTES:,}")


def _failed(record: Record, reason: str, detail: str) -> Record:
    record.error, record.error_detail = reason, detail
    return record


def read_html(source: str, path: str, name: str, url: Optional[str] = None,
              max_bytes: Optional[int] = None) -> Iterator[Record]:
    record = Record(source, path, name, url=url, content_type="text/html")
    try:
        with open_binary(path) as fh:
            record.html = fh.read(-1 if max_bytes is None else max_bytes + 1)
            size = len(record.html) + (_count_rest(fh) if max_bytes is not None and len(record.html) > max_bytes else 0)
    except (OSError, EOFError) as e:
        yield _failed(record, "corrupt", f"{type(e).__name__}: {e}")
        return
    if max_bytes is not None and size > max_bytes:
        record.html = record.html[:RAW_HEAD_BYTES]
        yield _too_large(record, size, max_bytes)
    else:
        yield _failed(record, "empty_file", "0 bytes") if not record.html.strip() else record


def _count_rest(fh, line: bool = False) -> int:
    """Read to the end of the file (or of the line, newline excluded) keeping nothing; the bytes passed."""
    n = 0
    while True:
        chunk = fh.readline(_READ_BYTES) if line else fh.read(_READ_BYTES)
        if line and chunk.endswith(b"\n"):
            return n + len(chunk.rstrip(b"\r\n"))
        if not chunk:
            return n
        n += len(chunk)


def read_jsonl(source: str, path: str, text_field: str, html_field: str, url_field: str,
               date_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
    lineno = 0
    try:
        with open_binary(path) as fh:
            # readline with a limit: one huge line is never held whole, nor parsed
            while line := fh.readline(-1 if max_bytes is None else max_bytes + 1):
                lineno += 1
                if not line.strip():
                    continue
                record = Record(source, path, f"line {lineno}")
                if max_bytes is not None and len(line.rstrip(b"\r\n")) > max_bytes:
                    size = len(line.rstrip(b"\r\n")) + (0 if line.endswith(b"\n") else _count_rest(fh, line=True))
                    record.html = line[:RAW_HEAD_BYTES]
                    yield _too_large(record, size, max_bytes)
                    continue
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
                 date_field: str, max_bytes: Optional[int] = None) -> Iterator[Record]:
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
        sizes = _document_bytes(batch, text_field, html_field) if max_bytes is not None else None
        if sizes is not None:
            batch = _without_values(batch, (text_field, html_field), pc.greater(sizes, max_bytes))
            sizes = sizes.to_pylist()
        for k, data in enumerate(batch.to_pylist()):
            record = _from_fields(Record(source, path, f"row {row}"), data, text_field, html_field, url_field,
                                  date_field)
            yield _too_large(record, sizes[k], max_bytes) if sizes is not None and sizes[k] > max_bytes else record
            row += 1
    if row == 0:
        yield _failed(Record(source, path, "row 0"), "empty_file", "no rows")


def _document_bytes(batch: pa.RecordBatch, text_field: str, html_field: str) -> Optional[pa.Array]:
    """Bytes of each row's document: its text, or its html where the text is null (None: neither is a string)."""
    sizes = None
    for name in (html_field, text_field):  # the text wins where it is there, as in _from_fields
        if name in batch.schema.names and _stringlike(batch.schema.field(name).type):
            column = batch.column(name)
            length = pc.binary_length(column)
            sizes = length if sizes is None else pc.if_else(pc.is_valid(column), length, sizes)
    return None if sizes is None else pc.fill_null(sizes, 0)


def _stringlike(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or \
        pa.types.is_large_binary(kind)


def _without_values(batch: pa.RecordBatch, names, where: pa.Array) -> pa.RecordBatch:
    """``batch`` with the columns ``names`` null in the rows ``where`` is true: oversized values never become Python."""
    if not pc.any(where).as_py():
        return batch
    columns = [pc.if_else(where, pa.nulls(len(batch), column.type), column) if name in names else column
               for name, column in zip(batch.schema.names, batch.columns)]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)
