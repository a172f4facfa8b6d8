"""Text sources: formats from real files, and bad input named down to the file and record."""
from __future__ import annotations

import bz2
import gzip
import json

import pytest

from pipeline.data.sources import SourceSpec, load_documents, load_source, split_long
from pipeline.errors import BadInput, ConfigError


def test_real_sources_load_with_one_text_column(data_dir, tmp_path):
    cache = str(tmp_path / "cache")
    web = load_source("web", SourceSpec(path=str(data_dir / "crawl/ccnet_docs/*.jsonl.gz")), cache)
    assert len(web) == 20 and web.column_names == ["text"]
    lines = load_source("novel", SourceSpec(path=str(data_dir / "pretrain/english_novels/Dickens_Oliver_1839.txt.gz"),
                                            sample_by="line"), cache)
    whole = load_source("novel", SourceSpec(path=str(data_dir / "pretrain/english_novels/Dickens_Oliver_1839.txt.gz"),
                                            sample_by="document"), cache)
    assert len(whole) == 1 and len(lines) > 1000
    both = load_documents({"web": SourceSpec(path=str(data_dir / "crawl/ccnet_docs")),
                           "novel": SourceSpec(path=str(data_dir / "pretrain/english_novels/Dickens_Oliver_1839.txt.gz"))},
                          cache)
    assert both.column_names == ["text", "source"] and sorted(set(both["source"])) == [0, 1]


def _jsonl(path, lines):
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("name", ["docs.jsonl.gz", "docs.jsonl.bz2", "docs.jsonl"])
def test_invalid_json_names_file_and_line(tmp_path, name):
    content = '{"text": "fine"}\n{"text": "cut in the mid\n'
    path = tmp_path / name
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    with opener(path, "wt") as fh:
        fh.write(content)
    with pytest.raises(BadInput, match=rf"{name}: line 2: invalid JSON"):
        load_source("web", SourceSpec(path=str(path)), str(tmp_path / "cache"))


def test_non_string_text_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl.gz", [json.dumps({"text": "ok"})] * 3 + [json.dumps({"text": {"a": 1}})])
    with pytest.raises(BadInput, match=r"line 4: field 'text' is dict, not a string"):
        load_source("web", SourceSpec(path=path), str(tmp_path / "cache"))


def test_missing_text_field_lists_the_fields(tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl.gz", [json.dumps({"body": "x", "url": "u"})])
    with pytest.raises(BadInput, match=r"has no field 'text' \(fields: body, url\); set its text_field"):
        load_source("web", SourceSpec(path=path), str(tmp_path / "cache"))
    ds = load_source("web", SourceSpec(path=path, text_field="body"), str(tmp_path / "cache"))
    assert ds["text"] == ["x"]


def test_missing_paths_and_unknown_formats_are_named(tmp_path):
    with pytest.raises(BadInput, match="source 'web': .*nowhere.jsonl does not exist"):
        load_source("web", SourceSpec(path=str(tmp_path / "nowhere.jsonl")), "")
    with pytest.raises(BadInput, match="no files match"):
        load_source("web", SourceSpec(path=str(tmp_path / "*.jsonl")), "")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(BadInput, match="cannot tell the format of .*data.csv"):
        load_source("web", SourceSpec(path=str(tmp_path / "data.csv")), "")
    with pytest.raises(ConfigError, match="sets neither of 'stage' and 'path'"):
        SourceSpec()
    with pytest.raises(ConfigError, match="sets both of 'stage' and 'path'"):
        SourceSpec(stage="filter", path="x.jsonl")


@pytest.mark.parametrize("text", ["", "short", "a\nbb\nccc\n" * 50, "x" * 95 + "\n" + "y" * 10, "no breaks " * 40])
def test_split_long_cuts_at_line_breaks_and_loses_nothing(text):
    pieces = split_long(text, 30)
    assert "".join(pieces) == text
    assert all(len(p) <= 30 for p in pieces)
    if "\n" in text and all(len(line) < 30 for line in text.split("\n")):
        assert all(p.endswith("\n") for p in pieces[:-1])


def test_long_novel_becomes_many_documents(data_dir, tmp_path):
    path = str(data_dir / "pretrain/english_novels/Dickens_Oliver_1839.txt.gz")
    ds = load_source("novel", SourceSpec(path=path, max_document_chars=8000), str(tmp_path))
    whole = load_source("novel", SourceSpec(path=path), str(tmp_path))["text"][0]
    assert len(ds) > len(whole) // 8000 and "".join(ds["text"]) == whole
