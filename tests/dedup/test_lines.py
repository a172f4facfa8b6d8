"""Line-level dedup keeps section headings: real PEPs keep "Abstract" and its underline, web boilerplate still goes."""
from __future__ import annotations

import gzip
import itertools
import json
import re
from collections import Counter

import pyarrow as pa
import pytest

from pipeline.dedup.lines import heading_rows
from pipeline.dedup.run import DedupSpec, deduplicate

ABSTRACT = re.compile(r"^Abstract\n([=\-~^*#])\1+$", re.M)  # the heading with its reST underline
PUBLIC_DOMAIN = "This document has been placed in the public domain."


@pytest.fixture(scope="module")
def peps(data_dir) -> list[str]:
    """The first 60 Python PEPs (reStructuredText)."""
    with gzip.open(data_dir / "domain/python_peps/peps.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, 60)]


def _stripped(text: str) -> set[str]:
    return {line.strip() for line in text.split("\n")}


def _lines_only(texts: list[str], **lines) -> dict:
    spec = DedupSpec()
    spec.url.enabled = spec.exact.enabled = spec.near.enabled = False
    for key, value in lines.items():
        setattr(spec.lines, key, value)
    result = deduplicate(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), spec, progress=False)
    assert result.kept.num_rows == len(texts)
    return {"texts": result.kept.column("text").to_pylist(), "stats": result.stats}


def test_pep_headings_survive_and_a_recurring_footer_does_not(peps):
    footer = "Printed from the PEP index at python.org"
    texts = [f"{p}\n\n{footer}\n" for p in peps]
    with_abstract = [i for i, t in enumerate(texts) if ABSTRACT.search(t)]
    assert len(with_abstract) >= 30 and sum(PUBLIC_DOMAIN in _stripped(t) for t in texts) >= 40
    out = _lines_only(texts)
    for i in with_abstract:
        assert ABSTRACT.findall(out["texts"][i]) == ABSTRACT.findall(texts[i]), f"PEP #{i} lost its Abstract heading"
        assert "\nCopyright\n=========" in out["texts"][i]
    assert not any(footer in t or PUBLIC_DOMAIN in _stripped(t) for t in out["texts"])
    kept = dict(out["stats"]["lines_headings_top"])
    overlined = "==========\n Abstract\n=========="  # one PEP's title has an overline too
    before, after = ([i for i, t in enumerate(ts) if overlined in t] for ts in (texts, out["texts"]))
    assert len(before) == 1 and after == before
    # PEP 12 shows "Copyright" in a literal block of sample text, not as a heading: it is not counted as one
    assert kept["abstract"] == len(with_abstract) + 1 and kept["copyright"] == 59 and "=========" in kept
    assert out["stats"]["lines_headings_kept"] >= 3 * len(with_abstract)  # Abstract, Copyright and underlines


def test_switching_keep_headings_off_cuts_every_line_in_enough_documents(peps):
    out = _lines_only(peps, keep_headings=False)
    def key(line: str) -> str:
        return " ".join(line.split()).lower()

    documents = Counter(k for p in peps for k in {key(line) for line in p.split("\n")} if k)
    frequent = {k for k, n in documents.items() if n >= 5}
    expected = ["\n".join(line for line in p.split("\n") if key(line) not in frequent).strip("\n") for p in peps]
    assert out["texts"] == expected and not any(ABSTRACT.search(t) for t in out["texts"])
    assert out["stats"]["lines_headings_kept"] == 0 and out["stats"]["lines_headings_top"] == []
    assert dict(out["stats"]["lines_top"])["abstract"] >= 30


def test_markdown_headings_stay_while_crawl_boilerplate_goes(passages):
    nav, cookie = "Home", "We use cookies to improve your experience. By continuing you accept our cookie policy."
    texts = [f"{nav}\nShare\n\n## Ingredients\n\n{p}\n\nConclusion\n----------\n\n{cookie}\nRead more about our "
             f"partners\n---\n#news" for p in passages[:8]]
    out = _lines_only(texts)
    for text, p in zip(out["texts"], passages):
        assert text == f"## Ingredients\n\n{p}\n\nConclusion\n----------", text[:200]
    assert dict(out["stats"]["lines_headings_top"]) == {"## ingredients": 8, "conclusion": 8, "----------": 8}
    assert set(dict(out["stats"]["lines_top"])) == {"home", "share", cookie.lower(), "read more about our partners",
                                                    "---", "#news"}


def test_heading_rows_follow_the_markup_not_any_line_of_punctuation():
    text = ("=====\nTitle\n=====\n\nAbstract\n========\nlong sentence that ends a paragraph\n---\n\n"
            "    ## not markdown (indented code)\n# Markdown\n#hashtag\n\n"
            "  File \"t.py\", line 3\n    lel3(x)\n    ^^^^^^^\n\n    )\n    ...\n\n"
            "Hooks:\n------\ninvoke_install\n^^^^^^^^^^^^^^")
    lines = text.split("\n")
    assert sorted(lines[i] for i in heading_rows(lines)) == sorted(
        ["=====", "Title", "=====", "Abstract", "========", "# Markdown", "Hooks:", "------", "invoke_install",
         "^^^^^^^^^^^^^^"])


def test_a_long_or_full_stopped_line_is_no_title_whatever_its_markup():
    lines = ["# Copyright (c) 2020 Example Corp. All rights reserved.", "", "# A comment on the next line of the code",
             "", "Subscribe to our newsletter.", "============================", "", "## Ingredients"]
    assert [lines[i] for i in sorted(heading_rows(lines))] == ["## Ingredients"]
