"""Zero-shot "TL;DR:" summarization: the PEP parser, plain text and sentences, prompt cutting, ROUGE,
the baselines, seeded sampling, transformers' decoding, and a run on real PEPs."""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.errors import BadInput
from pipeline.evaluate.models import ScoredModel
from pipeline.evaluate.summarize import (SUFFIX, SummaryDoc, baselines, body_sentences, fit_prompt, lead_3, random_3,
                                         read_peps, rouge, sample_docs, split_pep, summarize, summary_report,
                                         summary_text)
from pipeline.model.generate import DecodeSpec, generate
from pipeline.model.gpt import GPT, ModelConfig
from pipeline.tokenizer.build import byte_tokenizer

EOS = 256  # byte_tokenizer(["</s>", ...]): ids 0..255 are the bytes, "</s>" is 256
SUFFIX_IDS = list(SUFFIX.encode())  # 7 ids with the byte tokenizer
GREEDY = {"greedy": DecodeSpec("greedy")}
TOP_K2 = {"top_k2": DecodeSpec("sample", top_k=2)}

BODY = """\
Motivation
==========

People want spam. It is tasty, e.g. with eggs.

Details
-------

* one item
* two items

.. code-block:: python

    spam()"""

PEP = """\
PEP: 9999
Title: A made-up proposal
Author: Someone <a@b.org>
Post-History: 01-Jan-2020,
              02-Feb-2020


Abstract
========

This PEP adds ``spam()`` to :mod:`eggs`, see :pep:`8`.

Example::

    spam()

""" + BODY + """

Copyright
=========

This document is placed in the public domain.

..
   Local Variables:
   End:
"""


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer(["</s>", "<s>", "<pad>"])


@pytest.fixture(scope="module")
def gpt():
    """A random GPT with large weights: its greedy text changes with any token of the prompt."""
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, d_ff=64, context=64, vocab_size=260, init_std=0.5)).eval()


@pytest.fixture(scope="module")
def tiny(gpt, tokenizer):
    return ScoredModel("tiny", lambda ids: gpt(ids)[0], tokenizer, EOS, gpt.cfg.context, 0, gpt, "pipeline")


@pytest.fixture(scope="module")
def peps_path(data_dir):
    return data_dir / "domain" / "python_peps" / "peps.jsonl.gz"


@pytest.fixture(scope="module")
def every_pep(peps_path):
    return read_peps(peps_path)


def doc(body: str, reference: str = "people want spam", line: int = 1) -> SummaryDoc:
    return SummaryDoc(f"pep-{line:04d}", "t", body, reference, line)


# ---- parsing ----------------------------------------------------------------------------------

def test_a_pep_loses_header_abstract_back_matter_and_comments():
    body, abstract = split_pep(PEP)
    assert body == BODY
    assert abstract == "This PEP adds ``spam()`` to :mod:`eggs`, see :pep:`8`.\n\nExample::\n\n    spam()"

    # An overlined (inset) title and a "-" top-level style count; a subsection, a title in a literal block
    # and "Abstract and Rationale" do not.
    framed = "PEP: 1\n\n==========\n Abstract\n==========\n\nShort.\n\n======\n More\n======\n\nText.\n"
    assert split_pep(framed) == ("======\n More\n======\n\nText.", "Short.")
    # A style first seen inside the Abstract is a subsection of it, as in docutils.
    assert split_pep(framed.replace("======\n More\n======", "More\n====")) == ("", "Short.\n\nMore\n====\n\nText.")
    assert split_pep("PEP: 1\n\nAbstract\n--------\n\nShort.\n\nMore\n----\n\nText.\n")[1] == "Short."
    assert split_pep("PEP: 1\n\nIntro\n=====\n\nAbstract\n--------\n\nShort.\n") is None
    assert split_pep("PEP: 1\n\nIntro\n=====\n\nSee::\n\n    Abstract\n    ========\n\nText.\n") is None
    assert split_pep("PEP: 1\n\nAbstract and Rationale\n======================\n\nShort.\n") is None


def test_reading_counts_peps_without_an_abstract_and_names_bad_lines(tmp_path):
    path = tmp_path / "peps.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"id": "pep-9999", "title": "t", "text": PEP}) + "\n")
        no_abstract = "PEP: 9998\n\nIntro\n=====\n\nNo abstract.\n"
        f.write(json.dumps({"id": "pep-9998", "title": "u", "text": no_abstract}) + "\n")
    peps = read_peps(path)
    assert (peps.records, peps.with_abstract, len(peps.docs)) == (2, 1, 1)
    [only] = peps.docs
    assert (only.id, only.body, only.line) == ("pep-9999", BODY, 1)
    assert only.reference == "This PEP adds spam() to eggs, see PEP 8.\nExample:"

    plain = tmp_path / "bad.jsonl"
    plain.write_text(json.dumps({"text": PEP}) + "\n{not json\n")
    with pytest.raises(BadInput, match=r"bad\.jsonl, line 2: not JSON"):
        read_peps(plain)
    plain.write_text(json.dumps({"id": "x", "body": PEP}) + "\n")
    with pytest.raises(BadInput, match=r"bad\.jsonl, line 1: expected a JSON object with a string 'text'"):
        read_peps(plain)
    plain.write_text(json.dumps({"text": "PEP: 1\n\nNothing here.\n"}) + "\n")
    with pytest.raises(BadInput, match=r"none of its 1 records has a top-level Abstract"):
        read_peps(plain)


def test_the_real_peps_654_plus_seven_other_adornments_minus_two_empty_bodies(every_pep, peps_path):
    """The issue's 654 are the PEPs with "Abstract" underlined by "=" at column 0 (overline optional). Seven more
    have a top-level Abstract in another style; two have nothing outside Abstract and back matter."""
    with gzip.open(peps_path, "rt") as f:
        records = [json.loads(line) for line in f]
    equals_style = {r["id"] for r in records if re.search(r"^(=+\n)?Abstract\n=+$", r["text"], re.M)}
    assert len(equals_style) == 654
    other_styles = {"pep-0258", "pep-0517",  # "=" overline and underline, title inset by a space
                    "pep-0649",  # "*" overline and underline
                    "pep-0593", "pep-0612", "pep-0696", "pep-0718"}  # "-" is these PEPs' top-level style
    nothing_else = {"pep-0801", "pep-8000"}
    assert (every_pep.records, every_pep.with_abstract) == (703, 659)
    assert {d.id for d in every_pep.docs} == (equals_style | other_styles) - nothing_else
    assert all(d.body and d.reference for d in every_pep.docs)
    assert not any(re.search(r"^Copyright\n=+$|Local Variables:", d.body, re.M) for d in every_pep.docs)

    drawn = sample_docs(every_pep.docs, 5, seed=0)
    assert [d.line for d in drawn] == sorted(d.line for d in drawn) and len({d.id for d in drawn}) == 5
    assert [d.id for d in drawn] == [d.id for d in sample_docs(every_pep.docs, 5, seed=0)]
    assert [d.id for d in drawn] != [d.id for d in sample_docs(every_pep.docs, 5, seed=1)]
    assert len(sample_docs(every_pep.docs, 10_000, seed=0)) == 659


def test_sentences_skip_titles_code_tables_and_markup_and_lead_3_takes_the_first_three():
    body = """\
Rationale
=========

The ``x.y`` module (see `the docs <https://docs.python.org/>`_) is
slow [1]_.  Dr. Smith measured it, i.e. twice!  Is it fixed?  "Yes."
Version 3. Maybe.

The result is::

    >>> x = 1

+-----+-----+
| a   | b   |
+-----+-----+

=====  =====
col    col2

more   rows
=====  =====

- A list item
  that wraps.
- **Two**.

.. [1] A footnote. With sentences.
"""
    assert body_sentences(body) == ["The x.y module (see the docs) is slow.", "Dr. Smith measured it, i.e. twice!",
                                    "Is it fixed?", '"Yes."', "Version 3.", "Maybe.", "The result is:",
                                    "A list item that wraps.", "Two."]
    assert lead_3(body) == "The x.y module (see the docs) is slow. Dr. Smith measured it, i.e. twice! Is it fixed?"
    assert lead_3(BODY) == "People want spam. It is tasty, e.g. with eggs. one item"

    # random-3: three distinct sentences in document order, the same for the same generator seed.
    everything = body_sentences(body)
    picked = random_3(body, np.random.default_rng([0, 7]))
    positions = [everything.index(s) for s in re.split(r"(?<=[.!?:])\s+(?=[A-Z\"])", picked)]
    assert len(positions) == 3 and positions == sorted(set(positions))
    assert picked == random_3(body, np.random.default_rng([0, 7]))
    assert random_3("Only one.", np.random.default_rng(0)) == "Only one."


# ---- scoring ----------------------------------------------------------------------------------

def test_rouge_of_known_pairs_by_hand():
    # the cat sat on the mat / the cat lay on the mat: 5 of 6 unigrams, 3 of 5 bigrams, LCS 5.
    one = rouge(["the cat lay on the mat"], ["the cat sat on the mat"])
    assert [one.mean(k) for k in ("rouge1", "rouge2", "rougeL")] == pytest.approx([5 / 6, 3 / 5, 5 / 6])
    # Stemming: "runs" and "running" are both "run"; markup is removed before scoring.
    assert rouge(["``running`` dogs"], ["Runs dogs"]).mean("rouge1") == pytest.approx(1.0)
    # Mean and standard error over documents: ROUGE-1 F1 of 1 and of 1/3 (P = 1/2, R = 1/4).
    two = rouge(["a b", "x y d e"], ["a b", "c d f g"])
    f1 = 2 * (1 / 4) * (1 / 4) / (1 / 2)
    assert two.scores["rouge1"] == pytest.approx([1.0, f1]) and two.n == 2
    assert two.mean("rouge1") == pytest.approx((1 + f1) / 2)
    assert two.stderr("rouge1") == pytest.approx(abs(1 - f1) / 2)  # sample std / sqrt(2) of two values


def test_baselines_score_lead_3_and_random_3_against_the_reference():
    docs = [doc(BODY, "People want spam. It is tasty, e.g. with eggs. one item", line=3),
            doc(BODY, "two items", line=4)]
    scores = baselines(docs, seed=0)
    assert scores["lead3"].scores["rouge1"][0] == pytest.approx(1.0)
    # 12 lead-3 tokens ("e.g." is two), 2 reference tokens, "items" matches "item": P = 1/12, R = 1/2.
    assert scores["lead3"].scores["rouge1"][1] == pytest.approx(2 * (1 / 12) * (1 / 2) / (1 / 12 + 1 / 2))
    drawn = random_3(BODY, np.random.default_rng([0, 4]))  # doc 2's draw, seeded by (seed, its line)
    assert scores["random3"].scores["rouge1"][1] == pytest.approx(rouge([drawn], ["two items"]).mean("rouge1"))


# ---- decoding ---------------------------------------------------------------------------------

def test_the_prompt_loses_its_front_and_keeps_the_suffix_whole():
    body = list(b"abcdefgh")
    assert fit_prompt(body, SUFFIX_IDS, EOS, 16) == ([EOS, *body, *SUFFIX_IDS], False)
    assert fit_prompt(body, SUFFIX_IDS, EOS, 15) == ([*body, *SUFFIX_IDS], True)  # the prefix goes first
    assert fit_prompt(body, SUFFIX_IDS, EOS, 12) == ([*b"defgh", *SUFFIX_IDS], True)
    assert fit_prompt(body, SUFFIX_IDS, EOS, 8) == ([ord("h"), *SUFFIX_IDS], True)


def test_summaries_decode_the_cut_prompt_within_the_context(tiny, gpt, tokenizer):
    # context 64, max_new_tokens 8: a prompt keeps 56 ids, so a 48-byte body fits with its prefix, 49 bytes do not.
    fits, long = doc("f" * 47 + "!", line=1), doc("0123456789" * 10 + "end of it", line=2)
    result = summarize(tiny, [fits, long], GREEDY, max_new_tokens=8, source="peps.jsonl")
    assert (result.n, result.cut, result.prompt_budget) == (2, 1, 56)
    def greedy(prompt):
        return summary_text(tokenizer, generate(gpt, prompt, DecodeSpec(max_new_tokens=8), EOS), EOS)

    kept = [*long.body.encode()[-49:], *SUFFIX_IDS]
    assert result.decodings["greedy"].summaries == [greedy([EOS, *fits.body.encode(), *SUFFIX_IDS]), greedy(kept)]
    assert greedy(kept) not in (greedy(kept[1:]), greedy([ord("0"), *kept]))  # one id more or less shows


def test_a_context_too_short_for_suffix_and_budget_is_refused(tiny, tokenizer):
    docs = [doc("abc")]
    with pytest.raises(BadInput, match=r"model tiny: its context of 64 tokens cannot hold '\\nTL;DR:' \(7 tokens\), "
                                       r"max_new_tokens=57 and one token of a PEP from peps\.jsonl\.gz: lower "
                                       r"evaluate\.summarize\.max_new_tokens to at most 56"):
        summarize(tiny, docs, GREEDY, max_new_tokens=57, source="peps.jsonl.gz")
    assert summarize(tiny, docs, GREEDY, max_new_tokens=56).prompt_budget == 8  # "c" + the suffix
    small = GPT(ModelConfig(n_layer=1, n_head=1, d_model=8, d_ff=16, context=7, vocab_size=260)).eval()
    tiniest = ScoredModel("tiniest", lambda ids: small(ids)[0], tokenizer, EOS, 7, 0, small, "pipeline")
    with pytest.raises(BadInput, match=r"model tiniest: its context of 7 tokens .*leave the model out"):
        summarize(tiniest, docs, GREEDY, max_new_tokens=1)


def test_a_summary_ends_at_eos_or_its_first_blank_line(tokenizer):
    assert summary_text(tokenizer, [*b"\n\n  It adds spam.\nAnd eggs.\n \nMotivation"], EOS) == \
        "It adds spam.\nAnd eggs."
    assert summary_text(tokenizer, [*b" Spam", EOS, *b"ignored"], EOS) == "Spam"
    assert summary_text(tokenizer, [*b"\n\n\n"], EOS) == ""


def test_top_k_sampling_is_seeded_per_pep(tiny):
    docs = [doc("The spam module is slow. " * 3, line=n) for n in (10, 11, 12)]
    first = summarize(tiny, docs, TOP_K2, max_new_tokens=16).decodings["top_k2"].summaries
    again = summarize(tiny, docs[1:], TOP_K2, max_new_tokens=16).decodings["top_k2"].summaries
    assert again == first[1:]  # a PEP's sample does not depend on which others are drawn
    assert len(set(first)) > 1  # the same prompt, different PEPs: different draws
    other = {"top_k2": replace(TOP_K2["top_k2"], seed=1)}
    assert summarize(tiny, docs, other, max_new_tokens=16).decodings["top_k2"].summaries != first


def test_transformers_decodes_like_ours_and_refuses_beam_search(gpt, tiny, tokenizer, tmp_path, hub_offline):
    from pipeline.evaluate.models import transformers_model
    from pipeline.model.export import export_transformers

    tokenizer.save(str(tmp_path / "tokenizer.json"))
    out = export_transformers(gpt, tmp_path / "tokenizer.json", tmp_path / "hf")
    theirs = transformers_model("hf", out, "</s>", "cpu")
    docs = [doc("The spam module is slow. " * 3, line=n) for n in (10, 11)]
    both = {**GREEDY, **TOP_K2}
    hf, ours = summarize(theirs, docs, both, 16), summarize(tiny, docs, both, 16)
    assert hf.decodings["greedy"].summaries == ours.decodings["greedy"].summaries
    # Same filtering, and on the CPU torch's global generator seeded alike draws the same tokens.
    assert hf.decodings["top_k2"].summaries == ours.decodings["top_k2"].summaries
    with pytest.raises(BadInput, match=r"model hf is a transformers model.*use strategy greedy or sample"):
        summarize(theirs, docs, {"beam": DecodeSpec("beam")}, 16)


def test_end_to_end_on_five_real_peps(tiny, every_pep):
    from rouge_score import rouge_scorer

    docs = sample_docs(every_pep.docs, 5, seed=0)
    threads = torch.get_num_threads()
    result = summarize(tiny, docs, {**GREEDY, **TOP_K2}, max_new_tokens=16, source=str(every_pep.path),
                       cpu_threads=threads + 1)
    assert torch.get_num_threads() == threads  # decoding's thread count is restored
    assert (result.n, result.cut) == (5, 5)  # every PEP is longer than 48 bytes
    scores = baselines(docs, seed=0)
    markdown, metrics = summary_report([("tiny", result)], scores, every_pep)
    assert "5 PEPs drawn with seed 0 from the 659 of 703" in markdown
    assert "| baseline | lead3 | 5 |" in markdown
    assert f"| tiny | top_k2 | 5 | 5 (≤ 48) | {result.decodings['top_k2'].empty} |" in markdown
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name, decoded in result.decodings.items():
        direct = [scorer.score(d.reference, s) for d, s in zip(docs, decoded.summaries)]
        for kind in ("rouge1", "rouge2", "rougeL"):
            expected = np.mean([x[kind].fmeasure for x in direct])
            assert metrics[f"summarize/tiny/{name}/{kind}"] == pytest.approx(expected)
    assert metrics["summarize/baseline/lead3/rouge1"] == pytest.approx(scores["lead3"].mean("rouge1"))
    assert metrics["summarize/tiny/cut"] == 5
    assert 0 < metrics["summarize/baseline/random3/rougeL"] < 1
