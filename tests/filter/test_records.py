"""Crawl readers on the real WARC/WET/HTML files, and on broken copies of them: nothing goes missing."""
from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.filter.records import read_html, read_jsonl, read_parquet, read_warc


def test_warc_yields_pages_with_url_date_and_id(data_dir):
    records = list(read_warc("w", str(data_dir / "crawl/warc/dolma/sample-0000.warc.gz")))
    assert len(records) == 24  # 22 responses + 2 resources; requests and metadata are not documents
    pages = [r for r in records if r.content_type == "text/html"]
    assert len(pages) >= 20 and all(r.error is None for r in pages)
    first = pages[0]
    assert first.url == "https://www.semanticscholar.org/research/research-team"
    assert first.date == "2024-04-25T16:24:44Z" and first.record_id.startswith("<urn:uuid:")
    assert first.html.lstrip()[:15].lower().startswith(b"<!doctype html")  # HTTP headers are stripped


def test_wet_conversion_records_arrive_as_text(data_dir):
    (record,) = read_warc("w", str(data_dir / "crawl/warc/whirlwind/whirlwind.warc.wet.gz"))
    assert record.html is None and "Escopete" in record.text
    assert record.url == "https://an.wikipedia.org/wiki/Escopete"


def test_chunked_transfer_encoding_is_undone(data_dir):
    (record,) = read_warc("w", str(data_dir / "crawl/warc/warcio/example-iana.org-chunked.warc"))
    assert record.html.startswith(b"<!doctype html>") and record.html.rstrip().endswith(b"</html>")
    assert record.charset == "utf-8"


def test_a_truncated_warc_keeps_what_came_before_and_rejects_the_broken_record(tmp_path, data_dir):
    whole = list(read_warc("w", str(data_dir / "crawl/warc/dolma/sample-0000.warc.gz")))
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes((data_dir / "crawl/warc/dolma/sample-0000.warc.gz").read_bytes()[:100_000])
    records = list(read_warc("w", str(cut)))
    assert records[-1].error == "truncated" and "the file ends" in records[-1].error_detail
    good = records[:-1]
    assert 0 < len(good) < len(whole) and all(r.error is None for r in good)
    assert [r.record_id for r in good] == [r.record_id for r in whole[:len(good)]]


def test_empty_and_garbage_files_become_rejected_records(tmp_path):
    empty = tmp_path / "empty.warc.gz"
    empty.write_bytes(b"")
    assert [r.error for r in read_warc("w", str(empty))] == ["empty_file"]
    garbage = tmp_path / "garbage.warc"
    garbage.write_bytes(b"this is not a WARC file\r\n\r\n" * 10)
    assert [r.error for r in read_warc("w", str(garbage))] == ["corrupt"]
    blank = tmp_path / "blank.html"
    blank.write_bytes(b"  \n")
    assert [r.error for r in read_html("h", str(blank), "blank.html")] == ["empty_file"]


def test_jsonl_bad_lines_are_rejected_records_and_the_rest_is_read(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(json.dumps({"text": "first", "url": "https://a.example/1"}).encode() + b"\n")
        fh.write(b'{"text": "broken\n')
        fh.write(b'{"text": "bad byte \xff here"}\n')
        fh.write(json.dumps({"html": "<p>third</p>"}).encode() + b"\n")
        fh.write(json.dumps({"title": "no text"}).encode() + b"\n")
    records = list(read_jsonl("j", str(path), "text", "html", "url", "date"))
    assert [r.error for r in records] == [None, "bad_json", "bad_json", None, "no_text_field"]
    assert records[0].text == "first" and records[0].url == "https://a.example/1"
    assert records[1].record_id == "line 2" and records[3].html == b"<p>third</p>"


def test_parquet_with_an_html_column(tmp_path):
    path = tmp_path / "pages.parquet"
    pq.write_table(pa.table({"html": ["<p>a</p>", "<p>b</p>"], "url": ["u1", "u2"]}), path)
    records = list(read_parquet("p", str(path), "text", "html", "url", "date"))
    assert [(r.html, r.url, r.record_id) for r in records] == [(b"<p>a</p>", "u1", "row 0"), (b"<p>b</p>", "u2", "row 1")]


def _response(http: bytes, n: int) -> bytes:
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:{n}>\r\nWARC-Target-URI: http://x.example/{n}\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http)}\r\n\r\n")
    return head.encode() + http + b"\r\n\r\n"


def test_chunk_extensions_are_read_and_a_cut_chunked_body_is_a_bad_record(tmp_path):
    # Why records.py decodes chunks itself: fastwarc's ChunkedReader refuses chunk extensions
    # (legal HTTP/1.1) and accepts a body without its final chunk.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
    path = tmp_path / "chunked.warc"
    path.write_bytes(_response(head + b"6;ext=1\r\n<p>hi \r\n4\r\nyou.\r\n0\r\n\r\n", 1)
                     + _response(head + b"6\r\n<p>hi \r\n", 2))
    ok, cut = read_warc("w", str(path))
    assert (ok.error, ok.html, ok.charset) == (None, b"<p>hi you.", "utf-8")
    assert cut.error == "bad_http" and cut.record_id == "<urn:uuid:2>"


WARC_24 = "crawl/warc/dolma/sample-0000.warc.gz"  # 22 responses + 2 resources: 24 documents


def _gzip_members(data: bytes) -> list[int]:
    """The offset of each gzip member in ``data``; a WARC writer gives every record its own."""
    starts, pos = [], 0
    while pos < len(data):
        starts.append(pos)
        inflate = zlib.decompressobj(wbits=31)
        inflate.decompress(data[pos:])
        pos = len(data) - len(inflate.unused_data)
    return starts


def _content(records) -> list[tuple]:
    return [(r.record_id, r.url, r.date, r.html, r.text, r.error) for r in records]


@pytest.mark.parametrize("where", ["appended", "between two records"])
def test_junk_in_a_warc_gz_loses_no_record_and_is_one_rejection_at_its_offset(tmp_path, data_dir, where):
    data = (data_dir / WARC_24).read_bytes()
    whole = list(read_warc("w", str(data_dir / WARC_24)))
    assert len(whole) == 24 and not any(r.error for r in whole)
    junk = b"\xff" + np.random.default_rng(0).bytes(4095)
    at = len(data) if where == "appended" else _gzip_members(data)[20]
    damaged = tmp_path / "damaged.warc.gz"
    damaged.write_bytes(data[:at] + junk + data[at:])

    records = list(read_warc("w", str(damaged)))
    assert _content([r for r in records if not r.error]) == _content(whole), "every intact record, unchanged"
    (bad,) = [r for r in records if r.error]
    assert bad.error == "corrupt" and bad.record_id == f"offset {at}" and bad.html == junk
    assert f"4,096 bytes from byte {at:,}" in bad.error_detail


def test_a_record_whose_gzip_member_is_damaged_is_rejected_not_read_as_good(tmp_path, data_dir):
    data = (data_dir / WARC_24).read_bytes()
    whole = list(read_warc("w", str(data_dir / WARC_24)))
    members = _gzip_members(data)
    start, end = members[20], members[21]
    block = zlib.decompressobj(wbits=31).decompress(data[start:end])
    victim = next(line.split(b": ")[1].decode() for line in block.split(b"\r\n") if line.startswith(b"WARC-Record-ID"))
    middle = (start + end) // 2
    damaged = tmp_path / "damaged.warc.gz"
    damaged.write_bytes(data[:middle] + bytes(200) + data[middle + 200:])

    records = list(read_warc("w", str(damaged)))
    assert _content([r for r in records if not r.error]) == _content([r for r in whole if r.record_id != victim])
    (bad,) = [r for r in records if r.error]
    assert bad.error == "corrupt" and bad.record_id == f"offset {start}" and f"at byte {end:,}" in bad.error_detail



@pytest.mark.parametrize("cut", [1, 4, 10])
def test_a_warc_gz_cut_in_its_last_member_counts_every_record_once(tmp_path, data_dir, cut):
    # Cut inside the last member's gzip trailer (1, 4 bytes) or its record's closing CRLF CRLF (10):
    # the last record's data all inflates, but its checksum is gone. It is the one rejection, under
    # its own id, never kept as good and rejected again as an "offset N" stretch.
    data = (data_dir / WARC_24).read_bytes()
    whole = list(read_warc("w", str(data_dir / WARC_24)))
    assert len(whole) == 24 and not any(r.error for r in whole)
    damaged = tmp_path / "cut.warc.gz"
    damaged.write_bytes(data[:-cut])

    records = list(read_warc("w", str(damaged)))
    assert len(records) == len(whole), "every document once: kept or rejected, not both"
    assert len({r.record_id for r in records}) == len(records), "no document twice"
    assert _content(records[:-1]) == _content(whole[:-1]), "the records before, unchanged"
    last = records[-1]
    assert (last.record_id, last.error) == (whole[-1].record_id, "truncated")
    assert f"the file ends inside the gzip member that starts at byte {_gzip_members(data)[-1]:,}" in \
        last.error_detail and "cannot be verified" in last.error_detail

def test_documents_over_the_byte_limit_are_rejected_unread(tmp_path):
    limit, big = 1000, b"<p>" + b"word " * 400 + b"</p>"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    warc = tmp_path / "pages.warc"
    warc.write_bytes(_response(head + big, 1) + _response(head + b"<p>small</p>", 2))
    records = list(read_warc("w", str(warc), max_bytes=limit))
    assert [(r.record_id, r.error) for r in records] == [("<urn:uuid:1>", "too_large"), ("<urn:uuid:2>", None)]
    assert f"{len(head + big):,} bytes, more than filter.max_document_bytes = 1,000" in records[0].error_detail

    page = tmp_path / "page.html.gz"
    page.write_bytes(gzip.compress(big))
    (record,) = read_html("h", str(page), "page.html.gz", max_bytes=limit)
    assert record.error == "too_large" and f"{len(big):,} bytes" in record.error_detail
    assert [r.error for r in read_html("h", str(page), "page.html.gz", max_bytes=len(big))] == [None]

    lines = tmp_path / "docs.jsonl"
    lines.write_text(json.dumps({"text": "small"}) + "\n" + json.dumps({"text": "x" * 5000}) + "\n" +
                     json.dumps({"text": "last"}))
    records = list(read_jsonl("j", str(lines), "text", "html", "url", "date", max_bytes=limit))
    assert [(r.record_id, r.error, r.text) for r in records] == \
        [("line 1", None, "small"), ("line 2", "too_large", None), ("line 3", None, "last")]
    assert records[1].error_detail.startswith("5,012 bytes, more than") and len(records[1].html) <= limit + 1

    table = tmp_path / "pages.parquet"
    pq.write_table(pa.table({"text": [None, "y" * 3000, "ok"], "html": ["<p>" + "z" * 3000 + "</p>", None, None]}),
                   table)
    records = list(read_parquet("p", str(table), "text", "html", "url", "date", max_bytes=limit))
    assert [r.error for r in records] == ["too_large", "too_large", None] and records[2].text == "ok"
    assert [r.error_detail.split(" bytes")[0] for r in records[:2]] == ["3,007", "3,000"]
    assert records[0].html is None and records[1].text is None, "an oversized value is never read into Python"
