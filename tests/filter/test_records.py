"""Crawl readers on the real WARC/WET/HTML files, and on broken copies of them: nothing goes missing."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq

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
    assert records[-1].error == "truncated" and "rest of the file" in records[-1].error_detail
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
