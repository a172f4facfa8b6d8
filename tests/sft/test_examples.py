"""One run's examples from real instruction files: held out by content, encoded to the window, counted."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import SftSource
from pipeline.errors import BadInput
from pipeline.sft.chat import IGNORE
from pipeline.sft.examples import build_examples, window
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer

SPECIAL = SpecialTokens()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    byte_tokenizer(SPECIAL.all()).save(str(path))
    return path


def spec(data_dir, **changes) -> dict:
    """build_examples' settings: the self-instruct seed tasks, a fifth held out, a 96-token window."""
    seed = SftSource(format="self_instruct", path=str(data_dir / "instruct" / "self_instruct" / "seed_tasks.jsonl"))
    values = {"sources": {"seed": seed}, "template": "chatml", "max_tokens": 96, "val_fraction": 0.2,
              "val_max_per_source": 5, "drop_truncated": False}
    return {**values, **changes}


def build(data_dir, tokenizer_json, special=SPECIAL, **changes):
    settings = spec(data_dir, **changes)
    return build_examples(settings.pop("sources"), tokenizer_json, 256, special, 3, **settings)


def test_window_is_max_tokens_at_most_the_context():
    assert window(None, 256) == 256 and window(96, 256) == 96 and window(1000, 256) == 256


def test_examples_are_held_out_cut_to_the_window_and_counted(data_dir, tokenizer_json):
    data = build(data_dir, tokenizer_json)
    assert data.max_tokens == 96 and data.pad_id == data.tokenizer.token_to_id("<pad>")
    train = data.train_examples
    assert train and all(len(e.ids) <= 96 for e in train) and any(e.truncated for e in train)
    assert 0 < len(data.val["seed"]) <= 5  # only the first val_max_per_source are scored
    held = {c.id for c in data.mix.val["seed"]}
    assert not held & {e.id for e in train}

    m = data.metrics()
    assert m["data/seed/read"] == 175 and m["data/seed/bad_records"] == 0
    assert m["data/train_examples"] == len(train) == data.encoded["train"]["seed"]["kept"]
    assert m["data/trained_tokens"] == sum(sum(label != IGNORE for label in e.labels) for e in train)
    encoded = data.encoded
    assert m["data/seed/truncated"] == encoded["train"]["seed"]["truncated"] + encoded["val"]["seed"]["truncated"]
    assert set(data.counts()) == {"mixture", "bad_records", "encoded"} and data.bad_records() == {}

    prompts = data.prompts(2)  # the scored held-out conversations, not training ones
    assert [c.id for c in prompts] == [e.id for e in data.val["seed"][:2]] and {c.id for c in prompts} <= held


def test_dropping_cut_conversations_keeps_none_longer_than_the_window(data_dir, tokenizer_json):
    data = build(data_dir, tokenizer_json, drop_truncated=True, max_tokens=None)
    assert not any(e.truncated for e in data.train_examples) and data.metrics()["data/seed/dropped_too_long"] > 0


def test_bad_settings_are_named(data_dir, tokenizer_json):
    with pytest.raises(BadInput, match="sft.sources is empty"):
        build(data_dir, tokenizer_json, sources={})
    with pytest.raises(BadInput, match=r"no pad token '<nopad>' \(tokenizer.special_tokens.pad\)"):
        build(data_dir, tokenizer_json, dataclasses.replace(SPECIAL, pad="<nopad>"))
    with pytest.raises(BadInput, match="no held-out conversation is left"):
        build(data_dir, tokenizer_json, max_tokens=4, drop_truncated=True)
