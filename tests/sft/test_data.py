"""Instruction readers on the real files, bad records counted by reason, OASST best paths, the mixture."""
from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from pipeline.errors import BadInput
from pipeline.sft.data import (READERS, Conversation, ReadResult, best_path, gsm8k_final, is_held_out, mixture,
                               read_alpaca, read_conversations, read_gsm8k, read_oasst_tree, read_prompt_response,
                               read_self_instruct, read_source)


@pytest.fixture(scope="module")
def instruct(data_dir):
    return data_dir / "instruct"


def roles(conversation: Conversation) -> list[str]:
    return [m["role"] for m in conversation.messages]


def well_formed(conversation: Conversation) -> bool:
    turns = roles(conversation)
    turns = turns[1:] if turns[0] == "system" else turns
    return len(turns) % 2 == 0 and turns == ["user", "assistant"] * (len(turns) // 2) and \
        all(isinstance(m["content"], str) and m["content"].strip() for m in conversation.messages)


def write_jsonl(path, lines: list) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Real files


def test_alpaca_reads_codealpaca_and_counts_its_two_empty_outputs(instruct):
    result = read_alpaca(str(instruct / "codealpaca" / "code_alpaca_2k.json"), "code")
    assert len(result.conversations) == 2015 and result.bad == {"empty_output": 2}
    assert [e["where"].rsplit("/", 1)[1] for e in result.bad_examples] == ["code_alpaca_2k.json[237]",
                                                                           "code_alpaca_2k.json[1859]"]
    first = result.conversations[0]
    assert first.id == "code:0" and first.source == "code"
    assert first.messages == [
        {"role": "user",
         "content": "What are the distinct values from the given list?\n\ndataList = [3, 9, 3, 5, 7, 9, 5]"},
        {"role": "assistant", "content": "The distinct values from the given list are 3, 5, 7 and 9."}]
    no_input = next(c for c in result.conversations if "\n\n" not in c.messages[0]["content"])
    raw = json.loads((instruct / "codealpaca" / "code_alpaca_2k.json").read_text())[int(no_input.id.split(":")[1])]
    assert raw["input"] == "" and no_input.messages[0]["content"] == raw["instruction"]


def test_prompt_response_reads_all_p3_templates_without_endoftext(instruct):
    result = read_prompt_response(str(instruct / "p3_t0_subset"), "p3")
    # The TREC template's 200 completions are empty upstream: nothing but <|endoftext|>.
    assert len(result.conversations) == 6600 and result.bad == {"empty_completion": 200}
    assert "trec_what_category_best_describe.jsonl:1" in result.bad_examples[0]["where"]
    assert not any(c.messages[1]["content"].endswith("<|endoftext|>") for c in result.conversations)
    first = result.conversations[0]
    assert first.id == "p3:adversarial_qa_dbert_answer_the_following_q.jsonl:0"
    assert first.messages[0]["content"].startswith("Given the following passage\n\n\"A generation later")
    assert first.messages[1]["content"] == "subjective idealism"
    assert len({c.id for c in result.conversations}) == 6600


def test_gsm8k_keeps_the_whole_answer_and_final_is_extracted(instruct):
    result = read_gsm8k(str(instruct / "gsm8k" / "train.jsonl.gz"), "gsm8k")
    assert len(result.conversations) == 7473 and result.bad == {}
    first = result.conversations[0]
    assert first.messages[0]["content"].startswith("Natalia sold clips to 48 of her friends in April")
    assert first.messages[1]["content"] == ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                                            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
                                            "#### 72")
    assert gsm8k_final(first.messages[1]["content"]) == "72"
    assert gsm8k_final("so it costs\n#### 10,000") == "10000"
    assert gsm8k_final("The answer is 5.") is None and gsm8k_final("#### ") is None
    finals = [gsm8k_final(c.messages[1]["content"]) for c in result.conversations]
    assert all(f is not None and f.lstrip("-").replace(".", "").isdigit() for f in finals)


def test_self_instruct_seed_tasks_one_conversation_per_instance(instruct):
    result = read_self_instruct(str(instruct / "self_instruct" / "seed_tasks.jsonl"), "seed")
    assert len(result.conversations) == 175 and result.bad == {}
    by_id = {c.id: c for c in result.conversations}
    assert by_id["seed:seed_task_1:0"].messages == [
        {"role": "user", "content": "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"},
        {"role": "assistant", "content": "The relation between the given pairs is that they are opposites."}]
    assert by_id["seed:seed_task_0:0"].messages[0]["content"].startswith("Is there anything I can eat for a breakfast")
    assert "\n\n" not in by_id["seed:seed_task_0:0"].messages[0]["content"]  # its input is empty


def test_oasst_real_trees_give_one_well_formed_conversation_each(instruct):
    result = read_oasst_tree(str(instruct / "oasst" / "en_100_tree.jsonl.gz"), "oasst")
    # 5 of the 100 trees were written by a model (prompt and replies flagged synthetic).
    assert len(result.conversations) == 95 and result.bad == {"synthetic": 5}
    assert all(well_formed(c) and roles(c)[-1] == "assistant" for c in result.conversations)
    assert max(len(c.messages) for c in result.conversations) >= 4, "some paths go past the first exchange"
    trees = [json.loads(line) for line in gzip.open(instruct / "oasst" / "en_100_tree.jsonl.gz", "rt")]
    tree = next(t for t in trees if t["message_tree_id"] == result.conversations[0].id.split(":")[1])
    best_reply = next(r for r in tree["prompt"]["replies"] if r.get("rank") == 0)
    assert result.conversations[0].messages[:2] == [{"role": "user", "content": tree["prompt"]["text"]},
                                                    {"role": "assistant", "content": best_reply["text"]}]
    with_synthetic = read_oasst_tree(str(instruct / "oasst" / "en_100_tree.jsonl.gz"), "oasst", skip_synthetic=False)
    assert len(with_synthetic.conversations) == 100


def msg(text, role, rank=None, replies=(), **flags):
    return {"text": text, "role": role, "rank": rank, "replies": list(replies), "deleted": False,
            "synthetic": False, "review_result": True, **flags}


def test_oasst_best_path_follows_rank_zero_then_unranked_and_skips_flagged():
    tree = msg("Q", "prompter", replies=[
        msg("A-rank1", "assistant", 1, [msg("follow-up of rank 1", "prompter")]),
        msg("A-unranked", "assistant", None),
        msg("A-deleted", "assistant", -1, deleted=True),
        msg("A-rank0", "assistant", 0, [
            msg("Q2-synthetic", "prompter", synthetic=True),
            msg("Q2-rejected", "prompter", review_result=False),
            msg("Q2", "prompter"),  # unranked prompts: the first usable one in file order
            msg("Q2-later", "prompter"),
        ]),
    ])
    tree["replies"][3]["replies"][2]["replies"] = [msg("A2-unranked", "assistant"), msg("A2-rank2", "assistant", 2)]
    assert [m["text"] for m in best_path(tree)] == ["Q", "A-rank0", "Q2", "A2-rank2"]


def test_oasst_path_ending_on_an_unanswered_prompt_is_cut_and_bare_prompts_are_counted(tmp_path):
    answered = {"message_tree_id": "t1", "prompt": msg("Q", "prompter", replies=[
        msg("A", "assistant", 0, [msg("Q2 nobody answered", "prompter")])])}
    bare = {"message_tree_id": "t2", "prompt": msg("lonely Q", "prompter")}
    result = read_oasst_tree(write_jsonl(tmp_path / "trees.jsonl", [answered, bare]), "o")
    assert [(c.id, [m["content"] for m in c.messages]) for c in result.conversations] == [("o:t1", ["Q", "A"])]
    assert result.bad == {"no_assistant_reply": 1}


# ---------------------------------------------------------------------------------------------
# Bad records


def test_bad_alpaca_records_are_counted_by_reason_and_skipped(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Say hi", "output": "hi"},
        "{not json",
        {"instruction": "Say bye", "input": "politely"},
        {"instruction": "Count", "input": "", "output": "   "},
        {"instruction": ["a list"], "output": "x"},
        [1, 2],
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
    ])
    result = read_alpaca(path, "a")
    assert [c.messages[0]["content"] for c in result.conversations] == ["Say hi", "Add\n\n1 and 2"]
    assert [c.id for c in result.conversations] == ["a:0", "a:6"], "ids count bad records too, so they stay put"
    assert result.bad == {"invalid_json": 1, "missing_output": 1, "empty_output": 1, "not_string_instruction": 1,
                          "not_an_object": 1}
    assert [e["where"] for e in result.bad_examples] == [f"{path}:{line}" for line in (2, 3, 4, 5, 6)]


def test_bad_conversations_are_counted_and_sharegpt_roles_are_mapped(tmp_path):
    good = {"id": "c7", "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [
        good,
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"},
                      {"role": "assistant", "content": "Yes"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                      {"role": "user", "content": "And?"}]},
        {"messages": [{"role": "wizard", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "five"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"},
                      {"role": "assistant", "content": "ok"}]},
        {"messages": "hello"},
        {"turns": []},
    ])
    result = read_conversations(path, "c")
    assert [c.id for c in result.conversations] == ["c:c7"] and result.conversations[0].messages == good["messages"]
    assert result.bad == {"roles_out_of_order": 2, "no_final_assistant": 1, "unknown_role": 1,
                          "not_string_content": 1, "not_list_messages": 1, "missing_messages": 1}

    share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [
        {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}, {"from": "human", "value": "3+3?"},
        {"from": "gpt", "value": "6"}]}])
    (conversation,) = read_source("conversations", share, "sg", messages_field="conversations", role_field="from",
                                  content_field="value").conversations
    assert roles(conversation) == ["user", "assistant", "user", "assistant"] and conversation.id == "sg:0"


def test_unreadable_or_useless_files_raise_naming_the_file(tmp_path):
    with pytest.raises(BadInput, match="missing.jsonl does not exist"):
        read_gsm8k(str(tmp_path / "missing.jsonl"), "g")
    useless = write_jsonl(tmp_path / "useless.jsonl", [{"question": "q"}, "oops"])
    with pytest.raises(BadInput, match=r"useless.jsonl has no usable record \(missing_answer: 1, invalid_json: 1; "
                                       r"first: .*useless.jsonl:1: missing_answer"):
        read_gsm8k(useless, "g")
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(BadInput, match="broken.json: line 1: invalid JSON"):
        read_alpaca(str(tmp_path / "broken.json"), "a")
    (tmp_path / "not.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(BadInput, match="not.jsonl.gz: cannot be read"):
        read_gsm8k(str(tmp_path / "not.jsonl.gz"), "g")


def test_read_source_dispatches_and_rejects_unknown_formats_and_options(instruct):
    assert set(READERS) == {"alpaca", "prompt_response", "conversations", "oasst_tree", "gsm8k", "self_instruct"}
    path = str(instruct / "self_instruct" / "user_oriented_instructions.jsonl")
    assert len(read_source("self_instruct", path, "user").conversations) >= 252
    with pytest.raises(BadInput, match="format 'sharegpt' is unknown; use one of alpaca"):
        read_source("sharegpt", path, "user")
    with pytest.raises(BadInput, match="format 'gsm8k' takes no option output_field"):
        read_source("gsm8k", path, "user", output_field="x")


# ---------------------------------------------------------------------------------------------
# Mixture


def synthetic_source(name: str, n: int) -> ReadResult:
    return ReadResult([Conversation([{"role": "user", "content": f"{name} question {i}"},
                                     {"role": "assistant", "content": f"answer {i}"}], name, f"{name}:{i}")
                       for i in range(n)])


def test_mixture_holds_out_by_content_whatever_the_weights():
    sources = {"a": synthetic_source("a", 1000), "b": synthetic_source("b", 300)}
    one = mixture(sources, {"a": 1.0, "b": 1.0}, val_fraction=0.1, seed=3)
    again = mixture(sources, {"a": 1.0, "b": 1.0}, val_fraction=0.1, seed=3)
    reweighted = mixture(sources, {"a": 0.25, "b": 2.5}, val_fraction=0.1, seed=3)
    other_seed = mixture(sources, {"a": 1.0, "b": 1.0}, val_fraction=0.1, seed=4)
    ids = lambda m: {name: [c.id for c in v] for name, v in m.val.items()}  # noqa: E731
    assert ids(one) == ids(again) == ids(reweighted) != ids(other_seed)
    assert [c.id for c in one.train] == [c.id for c in again.train]
    assert 60 < len(one.val["a"]) < 140 and 10 < len(one.val["b"]) < 50
    held = {c.id for v in one.val.values() for c in v}
    assert not held & {c.id for c in reweighted.train}, "held-out examples never train"
    # Identical text in another source lands on the same side of the split.
    twin = Conversation(sources["a"].conversations[0].messages, "other", "other:0")
    assert is_held_out(twin, 0.1, 3) == ("a:0" in held)


def test_mixture_weights_subsample_repeat_and_count():
    sources = {"a": synthetic_source("a", 1000), "b": synthetic_source("b", 300), "c": synthetic_source("c", 50)}
    m = mixture(sources, {"a": 0.25, "b": 2.5, "c": 0.0}, val_fraction=0.1, seed=0)
    pool = {name: c["train_pool"] for name, c in m.counts.items()}
    assert m.counts["a"] == {"read": 1000, "val": 1000 - pool["a"], "train_pool": pool["a"],
                             "train": round(0.25 * pool["a"])}
    assert m.counts["b"]["train"] == round(2.5 * pool["b"]) and m.counts["c"]["train"] == 0 and m.val["c"]
    per_source = Counter(c.source for c in m.train)
    assert per_source == {"a": m.counts["a"]["train"], "b": m.counts["b"]["train"]}
    a_ids = [c.id for c in m.train if c.source == "a"]
    assert len(set(a_ids)) == len(a_ids), "w < 1 samples without replacement"
    b_uses = Counter(c.id for c in m.train if c.source == "b")
    assert set(b_uses.values()) == {2, 3} and len(b_uses) == pool["b"], "w = 2.5: two passes and half a third"
    assert [c.source for c in m.train[:50]] != sorted(c.source for c in m.train[:50]), "the training list is shuffled"
    # Another weight for b leaves a's sample as it was.
    m2 = mixture(sources, {"a": 0.25, "b": 1.0, "c": 0.0}, val_fraction=0.1, seed=0)
    assert sorted(c.id for c in m2.train if c.source == "a") == sorted(a_ids)


def test_mixture_rejects_bad_settings():
    sources = {"a": synthetic_source("a", 10)}
    with pytest.raises(BadInput, match="missing \\['a'\\], unknown \\['b'\\]"):
        mixture(sources, {"b": 1.0}, 0.1, 0)
    with pytest.raises(BadInput, match="weights.a=-1.0 must be >= 0"):
        mixture(sources, {"a": -1.0}, 0.1, 0)
    with pytest.raises(BadInput, match="val_fraction=1.0"):
        mixture(sources, {"a": 1.0}, 1.0, 0)
    with pytest.raises(BadInput, match="no training example"):
        mixture(sources, {"a": 0.0}, 0.1, 0)
