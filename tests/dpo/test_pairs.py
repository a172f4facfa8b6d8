"""Preference pairs: the two readers on the real files and on bad records, the prompt mask, the split."""
from __future__ import annotations

import gzip
import json

import pytest
from tokenizers import Tokenizer

from pipeline.dpo.pairs import (Pair, build_pairs, encode_pairs, encode_reply, is_held_out, read_hh_rlhf,
                                read_oasst_pairs)
from pipeline.errors import BadInput
from pipeline.sft.chat import IGNORE, render
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_tokenizer(SpecialTokens().all())


def test_hh_rlhf_reads_the_shared_prompt_and_the_two_last_replies(data_dir):
    path = data_dir / "preference" / "hh_rlhf" / "harmless-base-test.jsonl.gz"
    result = read_hh_rlhf(str(path), "hh")
    with gzip.open(path, "rt") as fh:
        first = json.loads(fh.readline())
    assert len(result.conversations) + sum(result.bad.values()) == 2312
    pair = result.conversations[0]
    assert pair.id == "hh:0" and pair.source == "hh"
    assert [m["role"] for m in pair.prompt] == ["user", "assistant"] * 2 + ["user"]
    assert pair.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first["chosen"].endswith(pair.chosen) and first["rejected"].endswith(pair.rejected)
    assert pair.chosen != pair.rejected
    # the real file's bad records are counted by reason, each named in the examples
    assert set(result.bad) <= {"empty_content", "prompts_differ", "roles_out_of_order"} and result.bad
    assert all(e["where"].startswith(str(path)) for e in result.bad_examples)


def test_hh_rlhf_bad_records_are_counted_by_name_and_the_good_one_kept(tmp_path):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    records = [
        good,
        {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a"},  # no rejected
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: bye\n\nAssistant: b"},
        {"chosen": "no dialogue at all", "rejected": "\n\nHuman: x\n\nAssistant: y"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more?", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    result = read_hh_rlhf(str(path), "mine")
    assert [(p.chosen, p.rejected) for p in result.conversations] == [("hello", "go away")]
    assert result.bad == {"identical_replies": 1, "missing_rejected": 1, "prompts_differ": 1, "not_a_dialogue": 1,
                          "no_final_assistant": 1, "invalid_json": 1}


def test_a_file_with_no_usable_pair_is_an_error_naming_it(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"chosen": "x"}) + "\n")
    with pytest.raises(BadInput, match=r"source 'mine': .*empty.jsonl has no usable record \(missing_rejected: 1"):
        read_hh_rlhf(str(path), "mine")


def _tree(replies):
    return {"message_tree_id": "t1", "prompt": {"message_id": "root0000", "role": "prompter", "text": "Question?",
                                                 "replies": replies}}


def _reply(text, rank, **extra):
    return {"message_id": f"m{text}", "role": "assistant", "text": text, "rank": rank, **extra}


def test_oasst_pairs_are_every_two_ranked_siblings_better_first(tmp_path):
    follow_up = {"message_id": "u1", "role": "prompter", "text": "And then?",
                 "replies": [_reply("D", 1), _reply("E", 0)]}
    tree = _tree([_reply("A", 0, replies=[follow_up]), _reply("B", 2), _reply("C", 1),
                  _reply("unranked", None), _reply("gone", 3, deleted=True)])
    no_ranks = {"message_tree_id": "t2", "prompt": {"role": "prompter", "text": "Q", "replies": [_reply("x", None)]}}
    path = tmp_path / "trees.jsonl"
    path.write_text(json.dumps(tree) + "\n" + json.dumps(no_ranks) + "\n")
    result = read_oasst_pairs(str(path), "oasst")
    got = {(p.prompt[-1]["content"], p.chosen, p.rejected) for p in result.conversations}
    assert got == {("Question?", "A", "B"), ("Question?", "A", "C"), ("Question?", "C", "B"), ("And then?", "E", "D")}
    deep = next(p for p in result.conversations if p.chosen == "E")
    assert [m["content"] for m in deep.prompt] == ["Question?", "A", "And then?"]
    assert result.bad == {"no_ranked_siblings": 1}
    assert len({p.id for p in result.conversations}) == 4


def test_oasst_pairs_whatever_the_order_of_the_siblings_and_bad_trees_by_reason(tmp_path):
    shuffled = _tree([_reply("B", 2), _reply("A", 0), _reply("C", 1)])
    deleted = {"message_tree_id": "t3", "prompt": {"role": "prompter", "text": "Q", "deleted": True,
                                                    "replies": [_reply("x", 0), _reply("y", 1)]}}
    broken = {"message_tree_id": "t4", "prompt": {"role": "prompter", "text": "Q", "replies": 5}}
    path = tmp_path / "trees.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in (shuffled, deleted, broken)) + "\n")
    result = read_oasst_pairs(str(path), "oasst")
    assert sorted((p.chosen, p.rejected) for p in result.conversations) == [("A", "B"), ("A", "C"), ("C", "B")]
    assert sorted(p.id for p in result.conversations) == ["oasst:t1:root0000:0>1", "oasst:t1:root0000:0>2",
                                                          "oasst:t1:root0000:1>2"]
    assert result.bad == {"deleted_or_rejected": 1, "not_list_replies": 1}


def test_oasst_pairs_from_the_real_trees(data_dir):
    result = read_oasst_pairs(str(data_dir / "instruct" / "oasst" / "en_100_tree.jsonl.gz"), "oasst")
    assert len(result.conversations) == 732 and result.bad == {"synthetic": 5}  # trees a model prompted
    assert len({p.id for p in result.conversations}) == 732
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in result.conversations)


def test_only_the_reply_is_scored_and_the_prompt_renders_as_in_sft(tokenizer):
    special = SpecialTokens()
    pair = Pair([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                 {"role": "user", "content": "how?"}], "fine", "bad", "s", "s:0")
    encoded = encode_reply(tokenizer, pair, pair.chosen, "chatml", special.bos, special.eos)
    text = render([*pair.prompt, {"role": "assistant", "content": "fine"}], "chatml", special.bos, special.eos)
    assert tokenizer.decode(encoded.ids, skip_special_tokens=False) == text
    scored = tokenizer.decode([i for i, label in zip(encoded.ids, encoded.labels) if label != IGNORE],
                              skip_special_tokens=False)
    assert scored == "fine<|im_end|>", "the reply and its end of turn; the earlier reply 'yo' is masked too"


def test_pairs_too_long_are_counted_and_left_out_not_cut(tokenizer):
    special = SpecialTokens()
    short = Pair([{"role": "user", "content": "q"}], "a", "b", "s", "s:0")
    long = Pair([{"role": "user", "content": "q"}], "a", "b" * 200, "s", "s:1")
    kept, counts = encode_pairs([short, long], tokenizer, "chatml", 64, special.bos, special.eos)
    assert [p.pair.id for p in kept] == ["s:0"] and counts["dropped_too_long"] == 1
    assert all(len(p.chosen.ids) <= 64 and len(p.rejected.ids) <= 64 for p in kept)


def test_the_split_keeps_every_pair_of_one_prompt_on_one_side():
    prompt = [{"role": "user", "content": "same prompt"}]
    pairs = [Pair(prompt, f"a{i}", f"b{i}", "s", f"s:{i}") for i in range(20)]
    assert len({is_held_out(p, 0.5, seed=1) for p in pairs}) == 1
    others = [Pair([{"role": "user", "content": f"prompt {i}"}], "a", "b", "s", f"s:{i}") for i in range(400)]
    share = sum(is_held_out(p, 0.25, seed=1) for p in others) / len(others)
    assert 0.18 < share < 0.32


def test_build_pairs_names_an_empty_source_list_and_counts_per_source(tokenizer, data_dir):
    special = SpecialTokens()
    with pytest.raises(BadInput, match="dpo.sources is empty"):
        build_pairs({}, tokenizer, "chatml", 128, special.bos, special.eos, 0, 0.1, 8)

    class Source:
        format, path, options = "hh_rlhf", str(data_dir / "preference/hh_rlhf/harmless-base-test.jsonl.gz"), {}

    data = build_pairs({"hh": Source()}, tokenizer, "chatml", 256, special.bos, special.eos, 0, 0.2, 8)
    counts = data.counts["hh"]
    assert counts["read"] == counts["train"]["kept"] + counts["val"]["kept"] + counts["train"]["dropped_too_long"] \
        + counts["val"]["dropped_too_long"]
    assert len(data.val["hh"]) == 8 and len(data.train) == counts["train"]["kept"]
    assert data.metrics()["data/hh/dropped_too_long"] > 0
