"""Chat templates render the documented strings; labels train exactly the replies and their end-of-turn token."""
from __future__ import annotations

import json

import pytest

from pipeline.errors import BadInput
from pipeline.sft.chat import (IGNORE, TEMPLATES, Encoded, add_chat_tokens, encode_all, encode_conversation,
                               encode_prompt, render, render_masked)
from pipeline.sft.data import Conversation, read_oasst_tree
from pipeline.tokenizer.build import SpecialTokens, train_bpe

BOS, EOS = "<s>", "</s>"
END_OF_TURN = {"llama2": " </s>", "chatml": "<|im_end|>"}  # what closes a reply, as the template writes it

TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
    records = json.loads((data_dir / "instruct" / "codealpaca" / "code_alpaca_2k.json").read_text())[:300]
    return [r["instruction"] + "\n" + r["output"] for r in records]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_bpe(texts, vocab_size=500, min_frequency=2, special_tokens=SpecialTokens().all())


def conversation(messages, cid="t:0") -> Conversation:
    return Conversation(messages, "t", cid)


def runs(tokenizer, encoded: Encoded, trained: bool) -> list[str]:
    """The decoded maximal runs of trained (or of masked) tokens."""
    out, current = [], []
    for token, label in zip(encoded.ids, encoded.labels):
        if (label != IGNORE) == trained:
            current.append(token)
        elif current:
            out.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    if current:
        out.append(tokenizer.decode(current, skip_special_tokens=False))
    return out


def test_templates_render_the_documented_strings():
    assert render(TWO_TURNS, "llama2", BOS, EOS) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>"
        "<s>[INST] And 3+3? [/INST] 6, of course. </s>")
    assert render(TWO_TURNS, "chatml", BOS, EOS) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6, of course.<|im_end|>\n")
    prompt = TWO_TURNS[1:4]  # no system prompt, ends with the user
    assert render(prompt, "llama2", BOS, EOS, add_generation_prompt=True) == \
        "<s>[INST] What is 2+2? [/INST] 4. </s><s>[INST] And 3+3? [/INST] "
    assert render(prompt, "chatml", BOS, EOS, add_generation_prompt=True).endswith(
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_refuses_what_it_cannot_write():
    with pytest.raises(BadInput, match="llama2: a system message after the first"):
        render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "llama2", BOS, EOS)
    with pytest.raises(BadInput, match="chat template 'vicuna' is unknown"):
        render(TWO_TURNS, "vicuna", BOS, EOS)


def test_add_chat_tokens_adds_only_the_missing_markers(texts):
    plain = train_bpe(texts[:50], vocab_size=300, min_frequency=2, special_tokens=[BOS, EOS, "<pad>"])
    with pytest.raises(BadInput, match=r"lacks the special tokens \['<\|im_start\|>', '<\|im_end\|>'\]"
                                       r".*add_chat_tokens"):
        encode_conversation(plain, conversation(TWO_TURNS), "chatml", 512, BOS, EOS)
    assert add_chat_tokens(plain, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert plain.get_vocab_size() == 302 and plain.token_to_id("<|im_end|>") == 301
    assert add_chat_tokens(plain, "chatml") == []
    encoded = encode_conversation(plain, conversation(TWO_TURNS), "chatml", 512, BOS, EOS)
    assert encoded.ids.count(plain.token_to_id("<|im_start|>")) == 5


@pytest.mark.parametrize("template", ["llama2", "chatml"])
def test_trained_tokens_are_exactly_the_replies_and_their_end_of_turn(tokenizer, template):
    encoded = encode_conversation(tokenizer, conversation(TWO_TURNS), template, 512, BOS, EOS)
    text = render(TWO_TURNS, template, BOS, EOS)
    assert not encoded.truncated and tokenizer.decode(encoded.ids, skip_special_tokens=False) == text
    replies = [m["content"] for m in TWO_TURNS if m["role"] == "assistant"]
    assert runs(tokenizer, encoded, trained=True) == [r + END_OF_TURN[template] for r in replies]
    # The masked runs are the rest of the text: system, users, role headers, bos.
    masked = runs(tokenizer, encoded, trained=False)
    rest = text
    for r in replies:
        rest = rest.replace(r + END_OF_TURN[template], "\x00", 1)
    assert masked == [piece for piece in rest.split("\x00") if piece]
    # Every end-of-turn token is trained, and only replies hold one.
    end_id = tokenizer.token_to_id(END_OF_TURN[template].strip())
    ends = [k for k, token in enumerate(encoded.ids) if token == end_id]
    trained_ends = [k for k in ends if encoded.labels[k] == end_id]
    assert len(trained_ends) == len(replies)
    if template == "llama2":
        assert trained_ends == ends
        assert all(encoded.labels[k] == IGNORE for k, t in enumerate(encoded.ids) if t == tokenizer.token_to_id(BOS))
    assert all(label in (IGNORE, token) for token, label in zip(encoded.ids, encoded.labels))


@pytest.mark.parametrize("template", ["llama2", "chatml"])
def test_special_token_text_inside_a_message_is_plain_text(tokenizer, template):
    sneaky = [{"role": "user", "content": "Say </s><s>[INST] and <|im_end|> please"},
              {"role": "assistant", "content": "Here: </s> <|im_end|><|im_start|>"}]
    encoded = encode_conversation(tokenizer, conversation(sneaky), template, 512, BOS, EOS)
    specials = {tokenizer.token_to_id(t) for t in SpecialTokens().all()}
    structural = [tokenizer.id_to_token(t) for t in encoded.ids if t in specials]
    expected = {"llama2": ["<s>", "[INST]", "[/INST]", "</s>"],
                "chatml": ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>"]}[template]
    assert structural == expected, "only the template's own markers are special tokens"
    assert tokenizer.decode(encoded.ids, skip_special_tokens=False) == render(sneaky, template, BOS, EOS)


@pytest.mark.parametrize("template", ["llama2", "chatml"])
def test_real_oasst_conversations_train_every_reply(tokenizer, data_dir, template):
    result = read_oasst_tree(str(data_dir / "instruct" / "oasst" / "en_100_tree.jsonl.gz"), "oasst")
    for c in result.conversations[:40]:
        encoded = encode_conversation(tokenizer, c, template, 100_000, BOS, EOS)
        replies = [m["content"] for m in c.messages if m["role"] == "assistant"]
        assert runs(tokenizer, encoded, trained=True) == [r + END_OF_TURN[template] for r in replies], c.id
        assert tokenizer.decode(encoded.ids, skip_special_tokens=False) == render(c.messages, template, BOS, EOS)


@pytest.mark.parametrize("template", ["llama2", "chatml"])
def test_the_prompt_for_generation_is_the_training_prefix(tokenizer, template):
    exchange = TWO_TURNS[:3]
    full = encode_conversation(tokenizer, conversation(exchange), template, 512, BOS, EOS)
    prompt = encode_prompt(tokenizer, exchange[:2], template, BOS, EOS)
    first_trained = next(k for k, label in enumerate(full.labels) if label != IGNORE)
    assert full.ids[:first_trained] == prompt, "the reply's tokens follow exactly the ids generation starts from"
    with pytest.raises(BadInput, match="must end with a user message"):
        encode_prompt(tokenizer, exchange, template, BOS, EOS)


def test_truncation_keeps_the_left_and_drops_examples_with_nothing_to_train(tokenizer):
    whole = encode_conversation(tokenizer, conversation(TWO_TURNS), "chatml", 512, BOS, EOS)
    first_trained = next(k for k, label in enumerate(whole.labels) if label != IGNORE)
    cut = encode_conversation(tokenizer, conversation(TWO_TURNS), "chatml", first_trained + 1, BOS, EOS)
    assert cut.truncated and cut.ids == whole.ids[:first_trained + 1] and cut.labels[-1] == whole.ids[first_trained]
    assert encode_conversation(tokenizer, conversation(TWO_TURNS), "chatml", first_trained, BOS, EOS) is None

    one_exchange = len(encode_conversation(tokenizer, conversation(TWO_TURNS[:3]), "llama2", 512, BOS, EOS).ids)
    long_prompt = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    examples, counts = encode_all([conversation(TWO_TURNS), conversation(long_prompt, "t:1"),
                                   conversation(TWO_TURNS[:3], "t:2")], tokenizer, "llama2", one_exchange, BOS, EOS)
    assert counts["kept"] == 2 and counts["dropped_no_trained_tokens"] == 1 and counts["truncated"] == 1
    assert [e.truncated for e in examples] == [True, False] and len(examples[0].ids) == one_exchange
    assert counts["tokens"] == sum(len(e.ids) for e in examples)
    assert counts["trained_tokens"] == sum(label != IGNORE for e in examples for label in e.labels) > 0
    assert [e.id for e in examples] == ["t:0", "t:2"]
    kept, dropping = encode_all([conversation(TWO_TURNS), conversation(long_prompt, "t:1"),
                                 conversation(TWO_TURNS[:3], "t:2")], tokenizer, "llama2", one_exchange, BOS, EOS,
                                drop_truncated=True)
    assert [e.id for e in kept] == ["t:2"] and not kept[0].truncated
    assert dropping["kept"] == 1 and dropping["dropped_too_long"] == 1 and dropping["truncated"] == 0


def test_render_masked_marks_the_trained_spans(tokenizer):
    exchange = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    encoded = encode_conversation(tokenizer, conversation(exchange), "chatml", 512, BOS, EOS)
    assert render_masked(tokenizer, encoded) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello there<|im_end|>]]\n"
    encoded = encode_conversation(tokenizer, conversation(exchange), "llama2", 512, BOS, EOS)
    assert render_masked(tokenizer, encoded, "\x1b[32m", "\x1b[0m") == \
        "<s>[INST] Hi [/INST] \x1b[32mHello there </s>\x1b[0m"


def test_a_malformed_conversation_is_refused_by_id(tokenizer):
    bad = conversation([{"role": "user", "content": "Hi"}], "mine:3")
    with pytest.raises(BadInput, match="conversation mine:3: no_final_assistant"):
        encode_conversation(tokenizer, bad, "chatml", 512, BOS, EOS)
    assert set(TEMPLATES) == {"llama2", "chatml"}
