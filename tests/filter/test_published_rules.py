"""Gopher's and C4's rules as published: each value computed by hand from the definition on a small document.

The definitions are in pipeline/filter/quality.py's docstring; each test names the one it checks.
"""
from __future__ import annotations

import pytest

from pipeline.filter.quality import (BadWords, C4Spec, GopherSpec, c4_page, c4_text, document_metrics, first_failure,
                                     gopher_metrics, rules)

G = GopherSpec()


def gopher(text: str, lang: str = "en") -> dict:
    return gopher_metrics(text, lang, G)


def breaks(metrics: dict, rule: str, spec: GopherSpec = G) -> bool:
    checked = next(r for r in rules(spec, None) if r.name == rule)
    return checked.fails(metrics[checked.metric])


# --- Gopher: the 7 quality rules ---------------------------------------------------------------------------------

def test_words_are_tokens_without_their_edge_punctuation_and_symbol_tokens_are_not_words():
    m = gopher("The cat, the dog — and a bird.")  # "—" is a token of punctuation only
    assert m["words"] == 7
    assert breaks(m, "gopher.min_words") and not breaks(m, "gopher.min_words", GopherSpec(min_words=7))
    assert breaks(m, "gopher.max_words", GopherSpec(min_words=1, max_words=6))


def test_mean_word_length_counts_the_word_not_its_punctuation():
    m = gopher('Hello, world!! "ok"')  # 5 + 5 + 2 characters, 3 words
    assert m["mean_word_length"] == pytest.approx(4.0)
    assert breaks(gopher("a an to it is on"), "gopher.min_mean_word_length")  # 11 / 6 < 3


def test_hash_and_ellipsis_ratios_are_two_rules_per_word():
    m = gopher("alpha # beta # gamma")  # 2 hashes, 3 words (a lone '#' is not a word)
    assert m["hash_word_ratio"] == pytest.approx(2 / 3) and m["ellipsis_word_ratio"] == 0
    assert breaks(m, "gopher.max_hash_word_ratio") and not breaks(m, "gopher.max_ellipsis_word_ratio")
    m = gopher("Wait... what… no")  # "..." and "…" once each, 3 words
    assert m["ellipsis_word_ratio"] == pytest.approx(2 / 3) and m["hash_word_ratio"] == 0
    assert breaks(m, "gopher.max_ellipsis_word_ratio")


def test_bullet_lines_are_the_share_of_non_empty_lines_starting_with_a_bullet():
    m = gopher("• one thing\n- two things\nthree things\n\n* four things")  # 3 of 4 lines; the blank is no line
    assert m["bullet_line_fraction"] == pytest.approx(0.75)
    assert not breaks(m, "gopher.max_bullet_line_fraction")  # > 90% is the paper's limit
    assert breaks(gopher("• a\n• b\n• c\n• d\n• e\n• f\n• g\n• h\n• i\n• j\nk"), "gopher.max_bullet_line_fraction")


def test_ellipsis_lines_end_with_three_dots_or_the_ellipsis_character():
    m = gopher("one...\ntwo\nthree…\nfour")
    assert m["ellipsis_line_fraction"] == pytest.approx(0.5) and breaks(m, "gopher.max_ellipsis_line_fraction")


def test_alphabetic_words_hold_at_least_one_letter():
    m = gopher("abc 123 4x5 -- 42.")  # words abc, 123, 4x5, 42 ("--" is none); letters in 2
    assert m["words"] == 4 and m["alpha_word_fraction"] == pytest.approx(0.5)
    assert breaks(m, "gopher.min_alpha_word_fraction")


def test_the_stop_word_rule_wants_two_different_words_of_the_list():
    assert gopher("The the THE cat")["stop_words"] == 1  # one of the eight words, three times
    assert breaks(gopher("The the THE cat"), "gopher.min_stop_words")
    assert gopher("The cat of the house")["stop_words"] == 2
    assert not breaks(gopher("The cat of the house"), "gopher.min_stop_words")
    assert gopher("The cat of the house", lang="xx")["stop_words"] is None  # no list: not judged


# --- Gopher: the 13 repetition rules ------------------------------------------------------------------------------

def test_duplicate_lines_count_repeats_of_an_earlier_line_and_their_characters():
    m = gopher("aa\nbbbb\naa\naa\n")  # lines aa, bbbb, aa, aa: 2 repeats; 4 of 10 line characters
    assert m["duplicate_line_fraction"] == pytest.approx(0.5)
    assert m["duplicate_line_char_fraction"] == pytest.approx(0.4)
    assert breaks(m, "gopher.max_duplicate_line_fraction") and breaks(m, "gopher.max_duplicate_line_char_fraction")


def test_duplicate_paragraphs_are_separated_by_blank_lines():
    m = gopher("p one\n\np two x\n  \np one")  # "p one" (5), "p two x" (7), "p one" (5): 1 repeat of 3
    assert m["duplicate_paragraph_fraction"] == pytest.approx(1 / 3)
    assert m["duplicate_paragraph_char_fraction"] == pytest.approx(5 / 17)
    assert breaks(m, "gopher.max_duplicate_paragraph_fraction")
    assert breaks(m, "gopher.max_duplicate_paragraph_char_fraction")


def test_top_ngram_is_every_occurrence_of_the_most_frequent_one_over_the_word_characters():
    m = gopher("red fox red fox ran")  # (red, fox) twice: 2 x 6 of 15 word characters
    assert m["top_2gram_char_fraction"] == pytest.approx(12 / 15)
    assert breaks(m, "gopher.max_top_2gram_char_fraction")
    tie = gopher("aa b aa b ccc d ccc d")  # two 2-grams occur twice; the longer (ccc d, 4) counts: 8 of 14
    assert tie["top_2gram_char_fraction"] == pytest.approx(8 / 14)
    assert gopher("one two three four")["top_2gram_char_fraction"] == 0  # nothing repeats
    assert gopher("a b c a b c x y z")["top_3gram_char_fraction"] == pytest.approx(6 / 9)
    assert gopher("a b c d a b c d x")["top_4gram_char_fraction"] == pytest.approx(8 / 9)


def test_duplicate_ngrams_cover_the_words_of_repeats_each_word_once():
    m = gopher("a b c d e a b c d e f")  # the 5-gram a..e repeats once: 5 of 11 word characters
    assert m["duplicate_5gram_char_fraction"] == pytest.approx(5 / 11)
    assert breaks(m, "gopher.max_duplicate_5gram_char_fraction")
    # overlapping repeats: the 5-grams at 1 and 2 repeat the one at 0 and cover words 1..6 once, not 10 times
    assert gopher("a a a a a a a")["duplicate_5gram_char_fraction"] == pytest.approx(6 / 7)
    words = "a b c d e f g h i j".split()
    m = gopher(" ".join(words + words + ["k"]))  # every n from 5 to 10: the second copy, 10 of 21
    for n in range(5, 11):
        assert m[f"duplicate_{n}gram_char_fraction"] == pytest.approx(10 / 21)
        assert breaks(m, f"gopher.max_duplicate_{n}gram_char_fraction")


def test_there_are_the_papers_twenty_rules_with_its_thresholds():
    names = [r.name for r in rules(G, None)]
    # 7 quality rules + 13 repetition rules; word count and mean word length have two bounds each and the
    # symbol-to-word ratio is one check per symbol (hash, ellipsis): 23 checks
    assert len(names) == 23 and len(set(names)) == 23
    limits = {r.name: r.limit for r in rules(G, None)}
    assert (limits["gopher.min_words"], limits["gopher.max_words"]) == (50, 100_000)
    assert limits["gopher.max_duplicate_line_char_fraction"] == 0.2 and limits["gopher.max_top_4gram_char_fraction"] == 0.16
    assert limits["gopher.max_duplicate_10gram_char_fraction"] == 0.10


# --- C4 ------------------------------------------------------------------------------------------------------------

PAGE = "\n".join([
    "Home",                                                              # no end mark
    "Read more...",                                                      # ends in an ellipsis
    "Short line here.",                                                  # 3 words < 5
    "Please enable JavaScript to view the comments.",                    # javascript
    "This site uses cookies to improve your experience.",                # policy
    "The river rose after three days of heavy rain.[1]",                 # kept, citation cut
    "",
    "Farmers waited for dry weather before the harvest. It came late.",  # kept, two sentences
    "x" * 1001 + " is one very long word in a line.",                    # a word over 1,000 characters
    "Schools opened again on Friday with few pupils missing!",           # kept
])


def test_c4_removes_lines_first_in_the_reference_order_and_keeps_the_rest_cleaned():
    page = c4_page(PAGE, C4Spec())
    assert page.removed == {"no_end_mark": 2, "too_short": 1, "javascript": 1, "policy": 1, "too_long_word": 1}
    assert page.text == ("The river rose after three days of heavy rain.\n"
                         "Farmers waited for dry weather before the harvest. It came late.\n"
                         "Schools opened again on Friday with few pupils missing!")
    assert page.sentences == 4 and not page.lorem_ipsum and not page.curly_braces
    assert c4_text(PAGE, page.kept) == page.text, "the kept text is rebuilt from the stored line indices"


def test_c4_words_per_line_and_sentences_follow_the_implementation_not_the_prose():
    spec = C4Spec()
    assert (spec.min_words_per_line, spec.min_sentences) == (5, 3)
    four = "One two three four.\nOne two three four five."
    assert c4_page(four, spec).removed == {"too_short": 1}
    metrics, _ = document_metrics(PAGE, "en", None, spec)
    assert metrics["sentences"] == 4 and first_failure(metrics, rules(None, spec)) is None
    assert first_failure(metrics, rules(None, C4Spec(min_sentences=5))).name == "c4.min_sentences"


@pytest.mark.parametrize("line, rejected", [
    ("The function f() { return one; } is called first.", True),   # a line C4 would keep: page rejected
    ("var settings = {a: 1}", False),                               # no end mark: the line goes, the page stays
    ("Enable javascript { now } to see the whole page.", False),    # a javascript line goes before the brace check
    ("Lorem ipsum dolor sit amet, consectetur adipiscing.", True),  # placeholder text in a kept line
    ("Lorem ipsum.", False),                                        # too short: the line goes first
])
def test_lorem_ipsum_and_curly_braces_only_count_in_lines_that_got_past_the_line_checks(line, rejected):
    text = PAGE + "\n" + line
    metrics, _ = document_metrics(text, "en", None, C4Spec())
    failed = first_failure(metrics, rules(None, C4Spec()))
    assert (failed is not None) == rejected
    if rejected:
        assert failed.name in ("c4.curly_braces", "c4.lorem_ipsum")


# --- bad words (LDNOOBW) ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ldnoobw(data_dir) -> BadWords:
    return BadWords(str(data_dir / "wordlists/ldnoobw"))


def test_bad_words_match_whole_words_and_phrases_also_at_the_edges_of_a_line(ldnoobw):
    assert ldnoobw.find("An analysis of the data, and a therapist's notes.", "en") == []  # anal, rapist inside words
    assert ldnoobw.find("Anal fissures are treated with care.", "en") == ["anal"]  # first word of the text
    assert ldnoobw.find("They went to see 2 girls 1 cup.", "en") == ["2 girls 1 cup"]  # a phrase
    assert ldnoobw.find("nothing here", "xx") is None  # no list for the language: not judged


def test_bad_words_use_the_documents_language(ldnoobw):
    german = "Das ist ein arschloch, sagte er."
    assert ldnoobw.find(german, "de") == ["arschloch"]
    assert ldnoobw.find(german, "en") == []
    spec = C4Spec(bad_words="set")
    metrics, _ = document_metrics(PAGE + "\nThe fans said the film was shit from start to end.", "en", None, spec,
                                  ldnoobw)
    assert metrics["bad_words"] == 1 and first_failure(metrics, rules(None, spec)).name == "c4.bad_words"
    metrics, _ = document_metrics(PAGE, "en", None, spec, ldnoobw)
    assert metrics["bad_words"] == 0 and first_failure(metrics, rules(None, spec)) is None


def test_bad_words_are_judged_on_the_lines_c4_keeps(ldnoobw):
    removed_line = PAGE + "\nshit"  # too short: C4 removes the line before the page is judged
    metrics, _ = document_metrics(removed_line, "en", None, C4Spec(bad_words="set"), ldnoobw)
    assert metrics["bad_words"] == 0
