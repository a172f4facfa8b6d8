"""The filter's rules one at a time: charset handling, main text, language, URL lists, quality rules, PII."""
from __future__ import annotations

import gzip

import pytest

from pipeline.filter.extract import ExtractSpec, UndecodableError, decode_html, html_to_text
from pipeline.filter.langid import identify
from pipeline.filter.pii import PiiSpec, redact
from pipeline.filter.quality import STOP_WORDS, C4Spec, GopherSpec, document_metrics, first_failure, rules
from pipeline.filter.urls import UrlList

PROSE = ("The committee met on Tuesday to review the plan. It agreed that the budget should be cut, "
         "and that the work would start in spring with a small team. Members asked for a report on the "
         "costs of the first phase, and they wanted to have it before the next meeting. The chair said "
         "the report would be ready in two weeks, with a summary for the public.")

MORE = ("Rain fell across the valley for most of the week. Farmers waited for dry days before they could "
        "bring in what was left of the harvest, and several roads were closed after the river rose. By Friday "
        "the water had gone down, and schools opened again with only a few pupils missing.")
NO_STOP_WORDS = " ".join(w for w in f"{PROSE} {MORE}".split() if w.strip(".,").lower() not in STOP_WORDS["en"])


def _fail(text, lang="en", gopher=GopherSpec(), c4=C4Spec()):
    failed = first_failure(document_metrics(text, lang, gopher, c4)[0], rules(gopher, c4))
    return failed.name if failed else None


def test_clean_prose_passes_every_rule():
    assert _fail(PROSE) is None


@pytest.mark.parametrize("text, rule", [
    ("Too short. Only a few words here.", "gopher.min_words"),
    ("\n".join(["Buy now and save big on the shoes of today."] * 12), "gopher.max_duplicate_line_fraction"),
    ("\n".join(f"• item number {i} in the list of things" for i in range(60)), "gopher.max_bullet_line_fraction"),
    (PROSE + " ### ### ### ### ### ### ### ### ### ###", "gopher.max_hash_word_ratio"),
    (PROSE + " Wait... " * 8, "gopher.max_ellipsis_word_ratio"),
    (" ".join(["spam eggs"] * 40) + " " + PROSE, "gopher.max_top_2gram_char_fraction"),
    (NO_STOP_WORDS, "gopher.min_stop_words"),
    (PROSE + " Lorem ipsum dolor sit amet.", "c4.lorem_ipsum"),
    ("Call the function f() { return 1; } first. " + PROSE, "c4.curly_braces"),
])
def test_each_rule_catches_its_case(text, rule):
    assert _fail(text) == rule


def test_stop_words_are_not_judged_for_unlisted_languages():
    assert _fail(NO_STOP_WORDS, lang="xx") is None


def test_a_page_of_menu_lines_has_no_sentences_left():
    menu = "\n".join(["Home", "About us", "Products and services", "Contact", "Careers"] * 12)
    assert _fail(menu, gopher=None) == "c4.min_sentences"
    assert _fail("one two three four five six seven eight nine ten " * 6 + "end.", gopher=None) == "c4.min_sentences"


def test_declared_charset_wins_when_it_fits_and_detection_fixes_a_wrong_label():
    page = "<html><body><p>Grüße aus Köln, schöne Straße.</p></body></html>"
    assert decode_html(page.encode("utf-8"), "utf-8") == (page, "utf-8")
    text, charset = decode_html(page.encode("latin-1"), "utf-8")  # mislabelled: the bytes are Latin-1
    assert text == page and charset != "utf-8"


def test_a_few_stray_bytes_are_replaced_but_binary_junk_is_undecodable():
    page = ("<p>" + "Grüße aus Köln " * 200 + "</p>").encode() + b"\xff"
    text, _ = decode_html(page, "utf-8", max_invalid_fraction=0.01)
    assert text.endswith("\ufffd")
    with pytest.raises(UndecodableError):
        decode_html(bytes(range(128, 256)) * 50, "utf-8", max_invalid_fraction=0.01)


def test_main_text_extraction_drops_boilerplate(data_dir):
    raw = gzip.open(data_dir / "crawl/html/mozilla_readability/wikipedia/source.html.gz").read()
    html, _ = decode_html(raw, None)
    main = html_to_text(ExtractSpec())(html)
    whole = html_to_text(ExtractSpec(main_content=False))(html)
    assert "Mozilla" in main and len(main) < len(whole)
    other = html_to_text(ExtractSpec(engine="trafilatura"))(html)
    assert "Mozilla" in other and len(other) < len(whole)


def test_language_identification_on_real_pages():
    lang, score = identify(PROSE, 10_000)
    assert lang == "en" and score > 0.9
    lang, _ = identify("Die Stadt hat beschlossen, die Straße im nächsten Jahr zu erneuern und die Kosten zu teilen.",
                       10_000)
    assert lang == "de"


def test_url_lists_match_domains_subdomains_and_prefixes():
    lst = UrlList(["example.com", "https://news.site.org/private/", "www.other.net"])
    assert lst.match("https://example.com/a") == "example.com"
    assert lst.match("http://blog.example.com/x") == "example.com"
    assert lst.match("https://notexample.com/") is None
    assert lst.match("https://news.site.org/private/page") == "https://news.site.org/private/"
    assert lst.match("https://news.site.org/public/page") is None
    assert lst.match("https://www.other.net/") == "other.net" and lst.match(None) is None


def test_pii_placeholders_and_counts():
    text = ("Write to jane.doe@example.org or call +49 30 1234 5678. Server 192.168.1.20 and 2001:db8::8a2e:370:7334. "
            "Not PII: version 1.2.3.4.5, 999.1.1.1, the year 2024, 12:30, 3.14, 2020-01-15, logo@2x.png and "
            "2022-07-14 11:21:50.")
    out, counts = redact(text, PiiSpec())
    assert counts == {"email": 1, "ip_address": 2, "phone": 1}
    assert "<EMAIL>" in out and "<PHONE>" in out and out.count("<IP_ADDRESS>") == 2
    for kept in ("1.2.3.4.5", "999.1.1.1", "2024", "12:30", "3.14", "2020-01-15", "logo@2x.png", "2022-07-14 11:21:50"):
        assert kept in out, kept
    assert redact(text, PiiSpec(email=""))[1]["email"] == 0
