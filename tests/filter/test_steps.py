"""The filter's steps as built from their specs: order, switched-off steps, drops with reasons, build-time failures."""
from __future__ import annotations

import sys

import pytest
import trafilatura
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from pipeline.errors import ConfigError, PipelineError
from pipeline.filter.extract import Engine, ExtractSpec
from pipeline.filter.langid import LangIdSpec
from pipeline.filter.pii import PiiSpec
from pipeline.filter.quality import C4Spec, GopherSpec
from pipeline.filter.records import Record
from pipeline.filter.run import CrawlSource, Format
from pipeline.filter.steps import Doc, Extract, StepsSpec, ToxicitySpec, build_steps, first_drop
from pipeline.filter.urls import UrlSpec
from tests.filter.test_rules import PROSE

NO_LANGID = LangIdSpec(enabled=False)


def judge(steps, **record):
    doc = Doc(Record("s", "f", "1", **record))
    return doc, first_drop(steps, doc)


def test_steps_run_in_order_and_switched_off_ones_are_left_out(tmp_path):
    words = tmp_path / "toxic.txt"
    words.write_text("scumbag\n")
    every = build_steps(StepsSpec(toxicity=ToxicitySpec(words_file=str(words))))
    assert [s.name for s in every] == ["read", "urls", "extract", "langid", "score", "thresholds", "pii"]
    off = build_steps(StepsSpec(urls=UrlSpec(enabled=False), langid=NO_LANGID, gopher=GopherSpec(enabled=False),
                                c4=C4Spec(enabled=False), pii=PiiSpec(enabled=False)))
    assert [s.name for s in off] == ["read", "extract", "score", "thresholds"]  # scores: at least the word count


def test_switched_off_steps_do_not_reject():
    on = build_steps(StepsSpec(langid=NO_LANGID))
    off = build_steps(StepsSpec(langid=NO_LANGID, gopher=GopherSpec(enabled=False), c4=C4Spec(enabled=False)))
    doc, drop = judge(on, text="Too short to pass.")
    assert drop.rule == "gopher.min_words" and drop.step == "gopher" and (drop.value, drop.limit) == (4, 50)
    assert doc.metrics["words"] == 4, "the measurements stay on the rejected document"
    assert judge(off, text="Too short to pass.")[1] is None


def test_a_read_error_is_dropped_with_the_readers_reason():
    doc, drop = judge(build_steps(StepsSpec()), error="truncated", error_detail="100 of 900 bytes")
    assert (drop.rule, drop.detail) == ("read.truncated", "100 of 900 bytes") and doc.text is None


def test_kept_documents_are_enriched_and_redacted():
    doc, drop = judge(build_steps(StepsSpec()), text=PROSE + " Write to jane.doe@example.org for the minutes.")
    assert drop is None and doc.lang == "en" and doc.lang_score > 0.9
    assert doc.metrics["words"] > 50 and doc.pii["email"] == 1 and "<EMAIL>" in doc.kept_text


def test_toxicity_flags_by_default_and_rejects_when_asked(tmp_path):
    words = tmp_path / "toxic.txt"
    words.write_text("# comment line\nscumbag\ngo away\n")
    text = f"{PROSE} He called the mayor a scumbag and told him to go away."
    flag = build_steps(StepsSpec(langid=NO_LANGID, toxicity=ToxicitySpec(words_file=str(words))))
    doc, drop = judge(flag, text=text)
    assert drop is None and doc.toxic_words == 2 and doc.toxic
    strict = build_steps(StepsSpec(langid=NO_LANGID, toxicity=ToxicitySpec(words_file=str(words), reject=True)))
    doc, drop = judge(strict, text=text)
    assert drop.rule == "toxicity.words" and drop.value == 2 and "scumbag (1)" in drop.detail


def test_blocklist_and_optout_files(tmp_path):
    (tmp_path / "block.txt").write_text("spam.example\n")
    (tmp_path / "optout.txt").write_text("# owners who said no\nhttps://news.example/archive/\n")
    steps = build_steps(StepsSpec(urls=UrlSpec(blocklist_files=[str(tmp_path / "block.txt")],
                                               optout_files=[str(tmp_path / "optout.txt")])))
    assert judge(steps, url="http://shop.spam.example/x", text=PROSE)[1].rule == "urls.blocklist"
    _, drop = judge(steps, url="https://news.example/archive/2020/a", text=PROSE)
    assert drop.rule == "urls.optout" and drop.detail == "https://news.example/archive/"
    assert judge(steps, url="https://news.example/today", text=PROSE)[1] is None


def test_a_broken_extractor_fails_when_built_and_a_broken_page_only_rejects_that_page(monkeypatch):
    page = f"<html><body><article><p>{PROSE}</p></article></body></html>".encode()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "trafilatura", None)  # what a missing or broken install looks like to `import`
        with pytest.raises(PipelineError) as e:
            build_steps(StepsSpec(extract=ExtractSpec(engine="trafilatura")))
        message = str(e.value)
        assert "\n" not in message and "needs the package trafilatura" in message
        assert message.endswith("pip install trafilatura lxml_html_clean")
        assert [s.name for s in build_steps(StepsSpec())][:3] == ["read", "urls", "extract"], "resiliparse still works"

    real = trafilatura.extract

    def crashes_on_one_page(html, **options):
        if "crash here" in html:
            raise RuntimeError("parser bug")
        return real(html, **options)

    monkeypatch.setattr(trafilatura, "extract", crashes_on_one_page)
    step = Extract(ExtractSpec(engine="trafilatura"))
    good, broken = Doc(Record("s", "f", "1", html=page)), Doc(Record("s", "f", "2", html=page + b"<p>crash here</p>"))
    assert step(good) is None and "committee" in good.text
    drop = step(broken)
    assert (drop.rule, drop.detail) == ("extract.error", "RuntimeError: parser bug") and broken.text is None


def test_an_unknown_language_code_fails_when_built():
    with pytest.raises(PipelineError, match="'filter.langid.languages' has 'english'"):
        build_steps(StepsSpec(langid=LangIdSpec(languages=["en", "english"])))


@pytest.mark.parametrize("make, key", [
    (lambda: LangIdSpec(min_score=1.5), "min_score"),
    (lambda: LangIdSpec(max_chars=0), "max_chars"),
    (lambda: ExtractSpec(engine="lynx"), "engine"),
    (lambda: ExtractSpec(max_invalid_char_fraction=-0.1), "max_invalid_char_fraction"),
    (lambda: GopherSpec(min_words=-1), "min_words"),
    (lambda: GopherSpec(min_words=100, max_words=50), "max_words"),
    (lambda: GopherSpec(max_duplicate_line_fraction=1.2), "max_duplicate_line_fraction"),
    (lambda: GopherSpec(max_top_ngram_char_fraction={2: 2.0}), "max_top_ngram_char_fraction.2"),
    (lambda: C4Spec(min_words_per_line=-1), "min_words_per_line"),
    (lambda: C4Spec(max_bad_words=-1), "max_bad_words"),
    (lambda: PiiSpec(min_phone_digits=12, max_phone_digits=9), "max_phone_digits"),
    (lambda: ToxicitySpec(min_hits=0), "min_hits"),
    (lambda: CrawlSource(path="x", format="pdf"), "format"),
    (lambda: CrawlSource(path="x", max_files=-1), "max_files"),
])
def test_out_of_range_settings_name_their_key(make, key):
    with pytest.raises(ConfigError) as e:
        make()
    assert e.value.key == key


def test_choices_are_enums_that_compare_as_their_strings():
    spec = ExtractSpec(engine="trafilatura")
    assert spec.engine is Engine.trafilatura and spec.engine == "trafilatura"
    assert CrawlSource(path="x", format="warc").format is Format.warc


def test_the_specs_are_structured_configs():
    """What the config loader does with them: a bad choice fails at composition, listing the choices;
    a range check runs when the typed object is made."""
    node = OmegaConf.structured(StepsSpec)
    with pytest.raises(ValidationError, match="resiliparse, trafilatura"):
        node.extract.engine = "lynx"
    node.extract.engine = "trafilatura"
    node.langid.min_score = 2.0
    with pytest.raises(ConfigError, match="'min_score' is 2.0; it must be in \\[0, 1\\]"):
        OmegaConf.to_object(node)
    node.langid.min_score = 0.5
    spec = OmegaConf.to_object(node)
    assert spec.extract.engine is Engine.trafilatura and spec.gopher.max_top_ngram_char_fraction[2] == 0.2
    source = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CrawlSource), {"path": "a", "format": "html"}))
    assert source.format is Format.html


def test_the_document_byte_limit_is_checked():
    with pytest.raises(ConfigError, match="max_document_bytes"):
        StepsSpec(max_document_bytes=0)
    assert StepsSpec(max_document_bytes=None).max_document_bytes is None
