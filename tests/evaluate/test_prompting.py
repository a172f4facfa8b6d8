"""Prompting evaluation: continuation scores, truncation, label choice, demonstrations, readers, baselines."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from pipeline.errors import BadInput
from pipeline.evaluate.models import ScoredModel
from pipeline.evaluate.prompting import (Example, PromptTask, build_prompt, evaluate_task, read_piqa, read_sst2,
                                         render_prompts, score_candidates)
from pipeline.model.gpt import GPT, ModelConfig
from pipeline.tokenizer.build import byte_tokenizer

EOS = 256  # byte_tokenizer(["</s>"]): ids 0..255 are the bytes, "</s>" is 256


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer(["</s>"])


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, d_ff=64, context=64, vocab_size=260)).eval()


@pytest.fixture(scope="module")
def tiny(gpt, tokenizer):
    return ScoredModel("tiny", lambda ids: gpt(ids)[0], tokenizer, EOS, gpt.cfg.context, 0)


def fond_of(text: str, tokenizer, context: int = 4096) -> ScoredModel:
    """A model that, whatever it reads, puts nearly all its mass on the bytes of ``text``."""
    bias = torch.zeros(260)
    bias[list(text.encode())] = 20.0
    return ScoredModel("fake", lambda ids: bias.expand(*ids.shape, -1), tokenizer, EOS, context, 0)


def hand_score(gpt, ids: list[int], n_cont: int) -> float:
    """One forward pass over the whole sequence; log-softmax summed over the last n_cont targets."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(gpt(seq[:, :-1])[0][0], dim=-1)
    targets = seq[0, 1:]
    return sum(logprobs[t, targets[t]].item() for t in range(len(targets) - n_cont, len(targets)))


SENTIMENT = dict(name="sst2", template="Review: {sentence}\nSentiment:", labels=["negative", "positive"])


def reviews(labels: list[int], prefix: str = "s") -> list[Example]:
    return [Example({"sentence": f"{prefix}{i:02d}"}, y) for i, y in enumerate(labels)]


def test_scores_match_one_forward_pass_and_normalize_per_token(tiny, gpt):
    prompts = ["Review: a fine film\nSentiment:", "x", ""]
    continuations = [[" positive", " negative"], [" a"], [" ok then"]]
    scores = score_candidates(tiny, prompts, continuations, length_normalize=False, batch_size=3)
    mean = score_candidates(tiny, prompts, continuations, length_normalize=True, batch_size=2)
    for prompt, conts, got, got_mean in zip(prompts, continuations, scores, mean):
        for cont, score, score_mean in zip(conts, got, got_mean):
            expected = hand_score(gpt, [EOS, *prompt.encode(), *cont.encode()], len(cont.encode()))
            assert score == pytest.approx(expected, abs=1e-5)
            assert score_mean == pytest.approx(expected / len(cont.encode()), abs=1e-5)


def test_long_prompts_lose_their_start_and_the_continuation_is_kept_whole(tiny, gpt):
    seen = []
    recording = ScoredModel("rec", lambda ids: seen.append(ids.clone()) or gpt(ids)[0], tiny.tokenizer, EOS, 64, 0)
    prompt = "".join(chr(ord("a") + i % 26) for i in range(100))
    [[score]] = score_candidates(recording, [prompt], [[" yes"]], False, 4)
    kept = [*prompt.encode()[-61:], *b" yes"]  # 61 + 4 = 65 = context + 1 ids; the prefix goes too
    assert seen[0][0].tolist() == kept[:-1]
    assert score == pytest.approx(hand_score(gpt, kept, 4), abs=1e-5)

    [[_]] = score_candidates(tiny, [prompt], [["z" * 64]], False, 4)  # one prompt token of history is enough
    with pytest.raises(BadInput, match=r"sst2, example 3: continuation 'zzz.*65 tokens.*context of 64"):
        score_candidates(tiny, [prompt], [["z" * 65]], False, 4, where=["sst2, example 3"])
    # In a task, an example whose answer cannot fit is left out and counted; if that is every example, an error.
    task = PromptTask(**SENTIMENT, answers={"z" * 70: 0, "positive": 1})
    with pytest.raises(BadInput, match=r"task 'sst2': every example has an answer longer than model tiny's context"):
        evaluate_task(tiny, task, reviews([0, 1]))
    choose = PromptTask(name="piqa", template="Goal: {goal}\nSolution:", labels=["sol1", "sol2"])
    examples = [Example({"goal": "g"}, 0, ["short", "z" * 70]), Example({"goal": "h"}, 1, ["a", "b"]),
                Example({"goal": "i"}, 0, ["c", "d"])]
    result = evaluate_task(tiny, choose, examples)
    assert (result.n, result.skipped) == (2, 1) and [y for y, _ in result.predictions] == [1, 0]


def test_a_model_fond_of_positive_predicts_positive_everywhere(tokenizer):
    labels = [0, 1, 1, 0, 1]
    model = fond_of(" positive", tokenizer)
    task = PromptTask(**SENTIMENT, answers={"negative": 0, "positive": 1})
    result = evaluate_task(model, task, reviews(labels), batch_size=2)
    assert result.predictions == [(y, 1) for y in labels]
    assert result.accuracy == pytest.approx(3 / 5) and result.n == 5
    assert result.confusion == [[0, 2], [0, 3]]
    assert result.random_baseline == 0.5 and result.majority_baseline == pytest.approx(3 / 5)
    assert result.confusion_table().splitlines()[2:] == ["| negative | 0 | 2 |", "| positive | 0 | 3 |"]

    # A label scores as its best answer: " positive" wins label 1 although the first, the typical
    # (mean) and each other wording of label 1 lose to " negative".
    words = ["awful", "terrible", "zzzzzz", "positive"]
    [[*worse, best, negative]] = score_candidates(model, ["x"], [[f" {w}" for w in [*words, "negative"]]], False, 8)
    assert max(worse) < negative < best and sum([*worse, best]) / 4 < negative
    alone = PromptTask(**SENTIMENT, answers={**{w: 1 for w in words[:3]}, "negative": 0})
    assert all(p == 0 for _, p in evaluate_task(model, alone, reviews(labels)).predictions)
    several = PromptTask(**SENTIMENT, answers={**{w: 1 for w in words}, "negative": 0})
    assert all(p == 1 for _, p in evaluate_task(model, several, reviews(labels)).predictions)

    # Per-example choices: the label is the index of the right choice.
    piqa = PromptTask(name="piqa", template="Goal: {goal}\nSolution:", labels=["sol1", "sol2"])
    examples = [Example({"goal": "g"}, 1, ["negative", "positive"]),
                Example({"goal": "h"}, 0, ["positive", "negative"]),
                Example({"goal": "i"}, 0, ["terrible", "positive"])]
    result = evaluate_task(model, piqa, examples)
    assert result.predictions == [(1, 1), (0, 0), (0, 1)] and result.confusion == [[1, 1], [0, 1]]


def test_k_shot_prompts_show_k_solved_others_and_are_reproducible(tokenizer):
    labels = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0]
    examples = reviews(labels)
    task = PromptTask(**SENTIMENT, answers={"positive": 1, "good": 1, "negative": 0}, shots=3, seed=7)
    prompts = render_prompts(task, examples)
    for i, prompt in enumerate(prompts):
        *demos, query = prompt.split("\n\n")
        assert query == f"Review: s{i:02d}\nSentiment:" and len(demos) == 3
        shown = [int(d.split("\n")[0].removeprefix("Review: s")) for d in demos]
        assert i not in shown and len(set(shown)) == 3
        assert demos == [f"Review: s{j:02d}\nSentiment: {['negative', 'positive'][labels[j]]}" for j in shown]
    assert render_prompts(task, examples) == prompts
    assert render_prompts(task, examples, limit=4) == prompts[:4], "an example's prompt does not depend on limit"
    assert render_prompts(replace(task, seed=8), examples) != prompts

    train = reviews([1, 0, 1, 1], prefix="t")
    for prompt in render_prompts(task, examples, train_examples=train):
        assert prompt.count("Review: t") == 3 and prompt.count("Review: s") == 1
    assert build_prompt(task, examples[0], []) == "Review: s00\nSentiment:"
    with pytest.raises(BadInput, match="shots=3 but train_examples hold only 2"):
        render_prompts(task, examples, train_examples=train[:2])

    # evaluate_task reads exactly these prompts, each after the prefix token.
    seen = []
    bias = fond_of(" positive", tokenizer).logits_fn
    recording = ScoredModel("rec", lambda ids: seen.extend(ids.tolist()) or bias(ids), tokenizer, EOS, 4096, 0)
    evaluate_task(recording, task, examples, batch_size=4)
    read = {bytes(b for b in row if b < 256).decode() for row in seen}  # drops the prefix and the padding
    assert read == {f"{p} {answer[:-1]}" for p in prompts for answer in task.answers}  # the last id is only a target


def test_readers_and_baselines_on_the_real_files(data_dir, tokenizer):
    dev, train = read_sst2(data_dir / "eval/sst2/dev.tsv"), read_sst2(data_dir / "eval/sst2/train.tsv")
    assert len(dev) == 872 and sum(e.label for e in dev) == 444
    assert len(train) == 6920 and sum(e.label for e in train) == 3610
    assert dev[0].fields == {"sentence": "one long string of cliches"} and dev[0].label == 0

    task = PromptTask(**SENTIMENT, answers={"negative": 0, "positive": 1})
    result = evaluate_task(fond_of(" positive", tokenizer, context=64), task, dev, train_examples=train,
                           batch_size=64)
    assert result.metrics() == {"accuracy": pytest.approx(444 / 872), "random_baseline": 0.5,
                                "majority_baseline": pytest.approx(444 / 872), "n": 872, "skipped": 0}
    assert result.confusion == [[0, 428], [0, 444]]
    # Without train examples the majority label is the evaluated examples' own (here negative, 2 of 3).
    assert evaluate_task(fond_of(" positive", tokenizer), task, reviews([0, 1, 0])).majority_baseline == \
        pytest.approx(2 / 3)

    piqa = read_piqa(data_dir / "eval/piqa/valid.jsonl", data_dir / "eval/piqa/valid-labels.lst")
    assert len(piqa) == 1838 and set(piqa[1].fields) == {"goal", "sol1", "sol2"}
    assert piqa[1].choices == [piqa[1].fields["sol1"], piqa[1].fields["sol2"]] and piqa[1].label == 1
    piqa_task = PromptTask(name="piqa", template="Question: {goal}\nAnswer:", labels=["sol1", "sol2"])
    result = evaluate_task(fond_of(" positive", tokenizer), piqa_task, piqa, limit=40)  # solutions run long
    assert result.n == 40 and result.random_baseline == 0.5
    assert sum(map(sum, result.confusion)) == 40


def test_malformed_files_and_tasks_are_named(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("fine\t1\nno tab here\n")
    with pytest.raises(BadInput, match=r"bad.tsv, line 2: expected 'sentence<TAB>label'"):
        read_sst2(bad)
    bad.write_text("fine\t1\nworse\t2\n")
    with pytest.raises(BadInput, match=r"bad.tsv, line 2: label '2' is not 0 or 1"):
        read_sst2(bad)
    with pytest.raises(BadInput, match="missing.tsv does not exist"):
        read_sst2(tmp_path / "missing.tsv")

    row = {"goal": "g", "sol1": "a", "sol2": "b"}
    jsonl, lst = tmp_path / "p.jsonl", tmp_path / "p.lst"
    jsonl.write_text(json.dumps(row) + "\n" + json.dumps({"goal": "g", "sol1": "a"}) + "\n")
    lst.write_text("0\n1\n")
    with pytest.raises(BadInput, match=r"p.jsonl, line 2: key 'sol2' is missing"):
        read_piqa(jsonl, lst)
    jsonl.write_text(json.dumps(row) + "\n{oops\n")
    with pytest.raises(BadInput, match=r"p.jsonl, line 2: not JSON"):
        read_piqa(jsonl, lst)
    jsonl.write_text(json.dumps(row) + "\n")
    with pytest.raises(BadInput, match=r"p.jsonl has 1 lines but .*p.lst has 2"):
        read_piqa(jsonl, lst)
    lst.write_text("yes\n")
    with pytest.raises(BadInput, match=r"p.lst, line 1: label 'yes'"):
        read_piqa(jsonl, lst)

    with pytest.raises(BadInput, match=r"'sst2': answers \{'maybe': 2\} map to labels outside 0..1"):
        PromptTask(**SENTIMENT, answers={"maybe": 2})
    with pytest.raises(BadInput, match="has no {answer} slot"):
        PromptTask(**SENTIMENT, answers={"yes": 1}, answer_template=" yes")
    task = PromptTask(name="t", template="{text}", labels=["a", "b"], answers={"a": 0, "b": 1})
    with pytest.raises(BadInput, match=r"task 't', query: the template needs field 'text'; the example has \['sent"):
        build_prompt(task, reviews([0])[0], [])


def test_a_configured_task_becomes_one_prompt_task_per_number_of_shots(tmp_path, tokenizer):
    from pipeline.evaluate.prompting import prompt_suite

    dev, train = tmp_path / "dev.tsv", tmp_path / "train.tsv"
    dev.write_text("".join(f"s{i}\t{i % 2}\n" for i in range(6)))
    train.write_text("t0\t1\nt1\t1\nt2\t0\n")
    config = dict(reader="sst2", path=str(dev), train_path=str(train), template="{sentence}:",
                  labels=["negative", "positive"], answers={"negative": 0, "positive": 1}, shots=[0, 2], limit=4)
    suite = prompt_suite("sst2", seed=3, **config)
    assert [(t.name, t.shots, t.seed) for t in suite.tasks] == [("sst2", 0, 3), ("sst2", 2, 3)]
    assert len(suite.examples) == 6 and len(suite.train_examples) == 3 and suite.limit == 4
    results = suite.evaluate(fond_of(" positive", tokenizer))
    assert [(r.shots, r.n, r.accuracy, r.majority_baseline) for r in results] == [(0, 4, 0.5, 0.5), (2, 4, 0.5, 0.5)]
    assert [r.metrics() for r in results] == [evaluate_task(fond_of(" positive", tokenizer), t, suite.examples,
                                                            suite.train_examples, limit=4).metrics()
                                              for t in suite.tasks]

    # A bad task fails when it is read, before any model is scored.
    with pytest.raises(BadInput, match="has no {answer} slot"):
        prompt_suite("sst2", **{**config, "answer_template": " yes"})
    with pytest.raises(BadInput, match=r"prompting task 'sst2': shots is empty"):
        prompt_suite("sst2", **{**config, "shots": []})
    with pytest.raises(BadInput, match=r"shots=-1 is negative"):
        prompt_suite("sst2", **{**config, "shots": [0, -1]})
