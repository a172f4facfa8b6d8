"""Exact match and ROUGE-L give hand-worked values; replies stop at end-of-turn, long prompts keep their end;
a fresh LoRA adapter replies exactly as its base; a model fine-tuned on a reply reproduces it."""
from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import BadInput
from pipeline.model.generate import DecodeSpec, generate
from pipeline.model.gpt import GPT, ModelConfig
from pipeline.sft.chat import IGNORE, encode_conversation, encode_prompt
from pipeline.sft.data import Conversation
from pipeline.sft.generation import (_lcs_length, compare, exact_match, generate_replies, markdown_table, normalize,
                                     prompt_and_reference, rouge_l, score, summary)
from pipeline.sft.lora import LoraSpec, add_lora
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer

BOS, EOS = "<s>", "</s>"
CONTEXT = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on shared cores extra ones wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("text, expected", [
    ("  The  Cat,\n sat!\t", "the cat sat"),
    ("x,y", "x y"),  # punctuation separates words, it does not glue them
    ("snake_case", "snake case"),
    ("Straße ÜBER 42", "straße über 42"),  # letters of any script and digits stay
    ("...", ""),
    ("", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("Paris.", "paris", 1.0),
    ("  PARIS  ", "Paris", 1.0),
    ("The answer is 4", "the answer is 4!", 1.0),
    ("the Paris", "Paris", 0.0),  # articles are kept
    ("4", "5", 0.0),
    ("", "", 1.0),
    ("", "Paris", 0.0),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat lay on the mat", 5 / 6),  # LCS 5 of 6 and 6: P = R = 5/6
    ("police kill the gunman", "police killed the gunman", 3 / 4),  # Lin (2004): LCS "police the gunman"
    ("the gunman kill police", "police killed the gunman", 2 / 4),  # same words, LCS only "the gunman"
    ("the cat", "the cat sat on the mat", 0.5),  # P = 1, R = 2/6: F = 2 * (1/3) / (4/3)
    ("a a a", "a", 0.5),  # P = 1/3, R = 1
    ("a b c d", "d c b a", 0.25),  # a bag of words would say 1.0
    ("The cat, sat.", "the cat sat", 1.0),
    ("dog", "cat", 0.0),
])
def test_rouge_l_hand_worked(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)
    assert rouge_l(reference, prediction) == pytest.approx(expected)  # F1 is symmetric


@pytest.mark.parametrize("prediction, reference, expected", [
    ("", "", 1.0), ("...", "", 1.0), ("", "cat", 0.0), ("cat", "", 0.0), ("!", "cat", 0.0)])
def test_rouge_l_empty_texts(prediction, reference, expected):
    assert rouge_l(prediction, reference) == expected
    assert exact_match(prediction, reference) <= rouge_l(prediction, reference)  # a match always scores 1


def test_lcs_matches_brute_force():
    rng = random.Random(0)

    def brute(a, b):
        def is_subsequence(s, t):
            it = iter(t)
            return all(x in it for x in s)
        return max(k for k in range(len(a) + 1) if any(is_subsequence(c, b) for c in itertools.combinations(a, k)))

    for _ in range(300):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        assert _lcs_length(a, b) == brute(a, b), (a, b)


def test_score_means_pair_by_pair():
    metrics = score(["a", "b c", "x"], ["A.", "b d", "y"])
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["rouge_l"] == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(BadInput, match="nothing to score"):
        score([], [])


# ---------------------------------------------------------------------------------------------
# Prompts and generation


def conversation(user: str, reply: str, source: str = "s", cid: str = "s:0", history=()) -> Conversation:
    return Conversation([*history, {"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                        source, cid)


def test_prompt_and_reference_cut_before_the_last_reply():
    history = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4"}]
    c = conversation("And 3+3?", "6", history=history)
    messages, reference = prompt_and_reference(c)
    assert reference == "6"
    assert messages == c.messages[:-1] and messages[-1] == {"role": "user", "content": "And 3+3?"}
    assert len(c.messages) == 5  # the conversation itself is untouched
    with pytest.raises(BadInput, match="does not end with an assistant reply"):
        prompt_and_reference(Conversation(c.messages[:-1], "s", "s:1"))


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer(SpecialTokens().all())


def tiny_gpt(tokenizer, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, context=CONTEXT,
                           vocab_size=tokenizer.get_vocab_size())).eval()


def always(model: GPT, token_id: int) -> GPT:
    """Make ``token_id`` the argmax everywhere: the final LayerNorm's zero weight leaves only its bias,
    set to the token's (tied) embedding of ones, whose dot product with itself (d_model) beats any other's."""
    with torch.no_grad():
        model.tok_emb.weight[token_id] = 1.0
        model.norm.weight.zero_()
        model.norm.bias.copy_(model.tok_emb.weight[token_id])
    return model


QUESTIONS = [conversation("Say hi.", "hi", cid="s:0"), conversation("Name a colour.", "red", cid="s:1")]


@pytest.mark.parametrize("template, end_of_turn", [("chatml", "<|im_end|>"), ("llama2", "</s>")])
def test_replies_stop_at_the_end_of_turn_token(tokenizer, template, end_of_turn):
    model = always(tiny_gpt(tokenizer), tokenizer.token_to_id(end_of_turn))
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    out = generate_replies(model, tokenizer, QUESTIONS, template, BOS, EOS, max_new_tokens=5)
    assert out.replies == ["", ""]  # the end-of-turn token came first and is not shown
    assert (out.unfinished, out.truncated_prompts) == (0, 0)
    assert len(calls) == 2  # one forward pass per question: decoding stopped at its first token


@pytest.mark.parametrize("token, reply", [("a", "aaaa"), ("<|im_start|>", "")])  # special tokens are hidden
def test_replies_without_end_of_turn_run_to_max_new_tokens(tokenizer, token, reply):
    model = always(tiny_gpt(tokenizer), tokenizer.token_to_id(token))
    out = generate_replies(model, tokenizer, QUESTIONS, "chatml", BOS, EOS, max_new_tokens=4)
    assert out.replies == [reply, reply]
    assert out.unfinished == 2


def test_replies_are_the_decoded_greedy_tokens(tokenizer):
    model = tiny_gpt(tokenizer, seed=3)
    out = generate_replies(model, tokenizer, QUESTIONS, "chatml", BOS, EOS, max_new_tokens=6)
    for c, reply in zip(QUESTIONS, out.replies):
        ids = encode_prompt(tokenizer, prompt_and_reference(c)[0], "chatml", BOS, EOS)
        new = generate(model, ids, DecodeSpec(max_new_tokens=6), eos_id=tokenizer.token_to_id("<|im_end|>"))
        assert isinstance(reply, str)
        assert reply == tokenizer.decode([t for t in new if t != tokenizer.token_to_id("<|im_end|>")],
                                         skip_special_tokens=True).strip()


def test_long_prompts_keep_their_end_and_are_counted(tokenizer):
    model = tiny_gpt(tokenizer, seed=1)
    long = conversation("x" * 200 + " What is the question?", "42", cid="s:long")
    out = generate_replies(model, tokenizer, [QUESTIONS[0], long], "chatml", BOS, EOS, max_new_tokens=8)
    assert out.truncated_prompts == 1  # default: context 64 - 8 new tokens = 56 prompt tokens
    ids = encode_prompt(tokenizer, prompt_and_reference(long)[0], "chatml", BOS, EOS)
    assert len(ids) > 200
    end_id = tokenizer.token_to_id("<|im_end|>")
    for keep in (56, 10):
        out = generate_replies(model, tokenizer, [long], "chatml", BOS, EOS, max_new_tokens=8,
                               max_prompt_tokens=None if keep == 56 else keep)
        new = generate(model, ids[-keep:], DecodeSpec(max_new_tokens=8), eos_id=end_id)
        expected = tokenizer.decode([t for t in new if t != end_id], skip_special_tokens=True).strip()
        assert out.replies == [expected] and out.truncated_prompts == 1
    with pytest.raises(BadInput, match="max_prompt_tokens=0"):
        generate_replies(model, tokenizer, [long], "chatml", BOS, EOS, max_new_tokens=8, max_prompt_tokens=0)


def test_mode_is_restored(tokenizer):
    model = tiny_gpt(tokenizer).train()
    generate_replies(model, tokenizer, QUESTIONS[:1], "chatml", BOS, EOS, max_new_tokens=2)
    assert all(m.training for m in model.modules())
    model.eval()
    generate_replies(model, tokenizer, QUESTIONS[:1], "chatml", BOS, EOS, max_new_tokens=2)
    assert not any(m.training for m in model.modules())


def test_a_fresh_adapter_replies_as_its_base(tokenizer):
    base = tiny_gpt(tokenizer, seed=2)
    questions = QUESTIONS + [conversation("Count to three.", "1 2 3", cid="s:2")]
    expected = generate_replies(base, tokenizer, questions, "chatml", BOS, EOS, max_new_tokens=10).replies
    tuned = add_lora(copy.deepcopy(base), LoraSpec(dropout=0.5)).train()  # dropout must be off while generating
    assert generate_replies(tuned, tokenizer, questions, "chatml", BOS, EOS, max_new_tokens=10).replies == expected
    assert tuned.training
    with torch.no_grad():  # a non-zero adapter does change the replies: they run through it
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 5.0, generator=torch.Generator().manual_seed(0))
    assert generate_replies(tuned, tokenizer, questions, "chatml", BOS, EOS, max_new_tokens=10).replies != expected


def fine_tune(model: GPT, tokenizer, conversations, steps: int = 40) -> GPT:
    encoded = [encode_conversation(tokenizer, c, "chatml", CONTEXT, BOS, EOS) for c in conversations]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for e in encoded:
            logits, _ = model(torch.tensor([e.ids]))
            loss = loss + F.cross_entropy(logits[0, :-1], torch.tensor(e.labels[1:]), ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_a_model_fine_tuned_on_the_replies_reproduces_them(tokenizer):
    held_out = [conversation("Say hi.", "hi", source="greet", cid="greet:0"),
                conversation("Name a colour.", "red | blue", source="colours", cid="colours:0")]
    base = tiny_gpt(tokenizer, seed=4)
    tuned = fine_tune(copy.deepcopy(base), tokenizer, held_out)
    base_out = generate_replies(base, tokenizer, held_out, "chatml", BOS, EOS, max_new_tokens=12)
    tuned_out = generate_replies(tuned, tokenizer, held_out, "chatml", BOS, EOS, max_new_tokens=12)
    assert tuned_out.replies == ["hi", "red | blue"] and tuned_out.unfinished == 0
    metrics = summary(compare(held_out, base_out.replies, tuned_out.replies))
    assert metrics["gen/sft/exact_match"] == metrics["gen/sft/rouge_l"] == 1.0
    assert metrics["gen/base/exact_match"] == 0.0


# ---------------------------------------------------------------------------------------------
# Side by side


@pytest.fixture
def rows():
    conversations = [conversation("Q" * 400, "the cat sat on the mat", source="a", cid="a:0"),
                     conversation("2+2?", "4", source="a", cid="a:1"),
                     conversation("Pipe?", "x | y\nz", source="b", cid="b:0")]
    return compare(conversations, ["the cat lay on the mat", "5", ""], ["the cat sat on the mat", "4", "x | y z"])


def test_compare_rows(rows):
    first = rows[0]
    assert (first["source"], first["id"], first["reference"]) == ("a", "a:0", "the cat sat on the mat")
    assert first["prompt"] == "Q" * 300 + "…"
    assert (first["base"], first["sft"]) == ("the cat lay on the mat", "the cat sat on the mat")
    assert first["base_rouge_l"] == pytest.approx(5 / 6) and first["base_exact_match"] == 0.0
    assert first["sft_rouge_l"] == first["sft_exact_match"] == 1.0
    assert rows[2]["prompt"] == "Pipe?" and rows[2]["sft_exact_match"] == 1.0  # "x | y\nz" normalises to "x y z"


def test_summary_names_and_means(rows):
    metrics = summary(rows)
    assert set(metrics) == {"gen/examples", "gen/examples/a", "gen/examples/b"} | {
        f"gen/{model}{source}/{metric}" for model in ("base", "sft") for source in ("", "/a", "/b")
        for metric in ("exact_match", "rouge_l")}
    assert metrics["gen/examples"] == 3 and metrics["gen/examples/a"] == 2
    assert metrics["gen/base/rouge_l"] == pytest.approx((5 / 6 + 0 + 0) / 3)
    assert metrics["gen/base/a/rouge_l"] == pytest.approx((5 / 6 + 0) / 2)
    assert metrics["gen/sft/exact_match"] == metrics["gen/sft/b/rouge_l"] == 1.0
    with pytest.raises(BadInput, match="nothing to summarise"):
        summary([])


def test_markdown_table(rows):
    text = markdown_table(rows, limit=2)
    lines = text.splitlines()
    assert lines[2] == "| all | 3 | 0.000 | 1.000 | 0.278 | 1.000 |"
    assert lines[3] == "| a | 2 | 0.000 | 1.000 | 0.417 | 1.000 |"
    assert lines[4] == "| b | 1 | 0.000 | 1.000 | 0.000 | 1.000 |"
    examples = lines[lines.index("") + 3:]
    assert [line.split(" | ")[0] for line in examples] == ["| a:0", "| a:1"]  # only the first `limit`
    assert "b:0" not in text
    last = markdown_table(rows, limit=3).splitlines()[-1]
    assert last.startswith("| b:0 | Pipe? | x \\| y<br>z |  | x \\| y z | 0.000 | 1.000 |")
    assert last.count(" | ") == 6  # escaped pipes do not open new cells
