"""What stored scores depend on, and what happens when they cannot be used."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import compose
from pipeline.contract import stage_config
from pipeline.filter.quality import BadWords
from pipeline.filter.run import CrawlSource, run_filter
from pipeline.stages import filter as filter_stage
from tests.filter.test_rules import MORE, PROSE


def _stage_cfg(*overrides: str):
    return stage_config("filter", filter_stage, compose("paths.outputs_dir=/tmp/unused", *overrides))


def test_thresholds_are_left_out_of_the_scoring_settings_but_what_is_measured_is_not():
    base = filter_stage.scoring_settings(_stage_cfg())
    assert filter_stage.scoring_settings(_stage_cfg("filter.gopher.min_words=100", "filter.c4.min_sentences=5",
                                                    "filter.toxicity.reject=true", "filter.pii.phone=''",
                                                    "filter.samples_per_rule=3")) == base
    # a new n-gram size is a new measurement, a new rule: the stored scores do not have it
    assert filter_stage.scoring_settings(
        _stage_cfg("filter.gopher.max_top_ngram_char_fraction={2:0.3,3:0.5,4:0.9}")) == base  # limits only
    assert filter_stage.scoring_settings(
        _stage_cfg("+filter.gopher.max_top_ngram_char_fraction={2:0.2,3:0.18,4:0.16,5:0.1}")) != base
    assert filter_stage.scoring_settings(_stage_cfg("filter.c4.min_words_per_line=3")) != base
    assert filter_stage.scoring_settings(_stage_cfg("filter.langid.min_score=0.5")) != base


def test_only_the_lists_of_enabled_steps_are_read_and_only_language_files_of_the_bad_words(data_dir, tmp_path):
    missing = str(tmp_path / "nowhere")
    off = _stage_cfg("filter.c4.enabled=false", f"filter.c4.bad_words={missing}", "filter.toxicity.enabled=false",
                     f"filter.toxicity.words_file={missing}/toxic.txt")
    assert all(not path.startswith(missing) for path in filter_stage.fingerprint(off))
    clone = tmp_path / "ldnoobw"
    (clone / ".git").mkdir(parents=True)
    for name in ("en", "de", "LICENSE", "fr-CA-u-sd-caqc", "README.md"):
        (clone / name).write_text((data_dir / "wordlists/ldnoobw" / name).read_text() if name in ("en", "de") else "x\n")
    listed = filter_stage.fingerprint(_stage_cfg(f"filter.c4.bad_words={clone}"))
    assert sorted(p for p in listed if p.startswith(str(clone))) == [str(clone / "de"), str(clone / "en")]
    index = (data_dir / "crawl/index.jsonl").resolve()
    assert any(Path(p).resolve() == index for p in filter_stage.fingerprint(_stage_cfg())), "the demo's URL index"


def test_a_document_without_a_language_is_judged_with_the_english_list(data_dir):
    words = BadWords(str(data_dir / "wordlists/ldnoobw"))
    assert words.find("The show was shit.", None) == ["shit"] and words.find("The show was shit.", "xx") is None


def test_damaged_stored_scores_are_scored_again_and_say_why(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in (PROSE + " " + MORE, "Too short.")))
    sources = {"d": CrawlSource(path=str(docs))}
    spec = compose("paths.outputs_dir=/tmp/unused", "filter.langid.enabled=false").filter
    first = run_filter(sources, spec, tmp_path / "a", 1, 5, scoring={"s": 1})
    again = run_filter(sources, spec, tmp_path / "b", 1, 5, scoring={"s": 1}, previous=tmp_path / "a")
    assert again["scores"]["rethresholded_from"] == str(tmp_path / "a") and again["funnel"] == first["funnel"]
    shard = tmp_path / "a" / "scores" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # cut short
    third = run_filter(sources, spec, tmp_path / "c", 1, 5, scoring={"s": 1}, previous=tmp_path / "a")
    assert third["scores"]["rethresholded_from"] is None and str(shard) in third["scores"]["unusable"]
    assert third["funnel"] == first["funnel"]
    other = run_filter(sources, spec, tmp_path / "d", 1, 5, scoring={"s": 2}, previous=tmp_path / "b")
    assert other["scores"]["rethresholded_from"] is None and "unusable" not in other["scores"]


@pytest.mark.parametrize("key", ["filter.reuse_scores=false"])
def test_reuse_can_be_switched_off_without_changing_what_is_scored(key):
    assert filter_stage.scoring_settings(_stage_cfg(key)) == filter_stage.scoring_settings(_stage_cfg())
