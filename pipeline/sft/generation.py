"""Replies generated for held-out instructions, scored against the reference replies: base model vs fine-tuned.

Each held-out conversation is cut before its final assistant reply; the model continues the prompt
greedily until the template's end-of-turn token, and the reply is scored against the reference by
exact match and ROUGE-L F1 (Lin 2004), both on normalised text (``normalize``).

Metric names (``summary``), for model in ``base`` | ``sft``, metric in ``exact_match`` | ``rouge_l``:

    gen/<model>/<metric>             mean over every example
    gen/<model>/<source>/<metric>    mean over one source's examples
    gen/examples                     number of examples scored
    gen/examples/<source>            ... of one source
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from tokenizers import Tokenizer

from pipeline.errors import BadInput
from pipeline.model.generate import DecodeSpec, generate
from pipeline.sft.chat import ChatTemplate, encode_prompt, get_template
from pipeline.sft.data import Conversation

MODELS = ("base", "sft")
METRICS = ("exact_match", "rouge_l")
PROMPT_CHARS = 300  # the prompt shown in a row of the side-by-side table

_NOT_WORD = re.compile(r"[\W_]+")  # any run of characters that is not a letter or digit (any script)


# ---------------------------------------------------------------------------------------------
# Metrics


def normalize(text: str) -> str:
    """Lowercase; every run of characters other than letters and digits becomes one space; stripped.

    Punctuation separates words rather than vanishing ("x,y" is "x y", not "xy"), as rouge_score's
    tokenizer does, but letters and digits of any script are kept. Articles are kept (unlike SQuAD):
    replies here are free-form sentences, not extracted spans, and "a" vs "the" can change an answer.
    """
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both texts are equal after ``normalize`` (two empty texts match), else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by the textbook DP kept to two rows."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over the words of the normalised texts.

    With L the longest common subsequence of the two word lists: precision L / len(prediction),
    recall L / len(reference), F1 their harmonic mean. Two empty texts score 1.0 (so an exact match
    always scores 1; rouge_score gives 0 here), one empty text against a non-empty one 0.0.
    """
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(not p and not r)
    common = _lcs_length(p, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ``exact_match`` and ``rouge_l`` of predictions against their references, pair by pair."""
    assert len(predictions) == len(references), (len(predictions), len(references))
    if not predictions:
        raise BadInput("nothing to score: there are no held-out examples (raise val_fraction)")
    n = len(predictions)
    return {"exact_match": sum(map(exact_match, predictions, references)) / n,
            "rouge_l": sum(map(rouge_l, predictions, references)) / n}


# ---------------------------------------------------------------------------------------------
# Generation


def prompt_and_reference(conversation: Conversation) -> tuple[list[dict], str]:
    """(messages up to and including the last user turn, the final assistant reply)."""
    messages = conversation.messages
    if not messages or messages[-1]["role"] != "assistant":
        raise BadInput(f"conversation {conversation.id} does not end with an assistant reply to score against")
    return list(messages[:-1]), messages[-1]["content"]


@dataclass
class Generations:
    replies: list[str]
    truncated_prompts: int  # prompts longer than max_prompt_tokens, whose start was cut off
    unfinished: int  # replies cut at max_new_tokens before the end-of-turn token


def generate_replies(model, tokenizer: Tokenizer, conversations: Sequence[Conversation],
                     template: Union[str, ChatTemplate], bos: str, eos: str, max_new_tokens: int,
                     max_prompt_tokens: Optional[int] = None) -> Generations:
    """The greedy reply of ``model`` (our GPT, or a peft model wrapping it) to each conversation's prompt.

    Generation stops at the template's end-of-turn token, which is dropped; the rest is decoded with
    special tokens hidden and stripped of surrounding whitespace. A prompt longer than
    ``max_prompt_tokens`` (default: the context less ``max_new_tokens``, at least 1) keeps its last
    tokens, where the question and the generation prompt are, so the reply fits the context.
    The model runs in eval mode and is put back in the mode it was in.
    """
    chat = get_template(template)
    end_of_turn = chat.end_of_turn or eos
    end_id = tokenizer.token_to_id(end_of_turn)
    if end_id is None:
        raise BadInput(f"the tokenizer lacks {end_of_turn!r}, which ends a reply in chat template '{chat.name}'")
    if max_prompt_tokens is None:
        max_prompt_tokens = max(1, model.cfg.context - max_new_tokens)
    if max_prompt_tokens < 1:
        raise BadInput(f"max_prompt_tokens={max_prompt_tokens}: must be at least 1")
    spec = DecodeSpec(strategy="greedy", max_new_tokens=max_new_tokens)
    replies, truncated, unfinished = [], 0, 0
    was_training = model.training
    model.eval()
    try:
        for conversation in conversations:
            messages, _ = prompt_and_reference(conversation)
            ids = encode_prompt(tokenizer, messages, chat, bos, eos)
            if len(ids) > max_prompt_tokens:
                ids = ids[-max_prompt_tokens:]
                truncated += 1
            new = generate(model, ids, spec, eos_id=end_id)
            if new and new[-1] == end_id:
                new = new[:-1]
            else:
                unfinished += max_new_tokens > 0
            replies.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return Generations(replies, truncated, unfinished)


def side_by_side(tuned, base, conversations: Sequence[Conversation], tokenizer: Tokenizer,
                 template: Union[str, ChatTemplate], bos: str, eos: str,
                 max_new_tokens: int) -> tuple[list[dict], dict[str, float]]:
    """The replies of the base model and of the fine-tuned one, as ``compare``'s rows, and their metrics
    (``summary``'s, and how many replies were unfinished or prompts cut). ``base`` None: ``tuned`` is a
    peft model, and the base is the same weights with the adapter switched off."""
    args = (tokenizer, conversations, template, bos, eos, max_new_tokens)
    sft = generate_replies(tuned, *args)
    if base is None:
        with tuned.disable_adapter():
            original = generate_replies(tuned, *args)
    else:
        original = generate_replies(base, *args)
    rows = compare(conversations, original.replies, sft.replies)
    return rows, {**summary(rows), "gen/sft/unfinished": sft.unfinished, "gen/base/unfinished": original.unfinished,
                  "gen/truncated_prompts": sft.truncated_prompts}


# ---------------------------------------------------------------------------------------------
# Side by side


def last_user(messages: Sequence[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + "…"


def compare(conversations: Sequence[Conversation], base_replies: Sequence[str],
            tuned_replies: Sequence[str]) -> list[dict]:
    """One row per example: source, id, prompt (its last user message, clipped), reference, base, sft,
    and ``<model>_<metric>`` for each model and metric (``base_exact_match``, ``sft_rouge_l``, ...)."""
    assert len(conversations) == len(base_replies) == len(tuned_replies), \
        (len(conversations), len(base_replies), len(tuned_replies))
    rows = []
    for conversation, base, tuned in zip(conversations, base_replies, tuned_replies):
        messages, reference = prompt_and_reference(conversation)
        row = {"source": conversation.source, "id": conversation.id,
               "prompt": _clip(last_user(messages), PROMPT_CHARS), "reference": reference, "base": base, "sft": tuned}
        for model, reply in (("base", base), ("sft", tuned)):
            row[f"{model}_exact_match"] = exact_match(reply, reference)
            row[f"{model}_rouge_l"] = rouge_l(reply, reference)
        rows.append(row)
    return rows


def summary(rows: Sequence[dict]) -> dict[str, float]:
    """Mean of every model's metrics, overall and per source, named as in the module docstring."""
    if not rows:
        raise BadInput("nothing to summarise: there are no held-out examples (raise val_fraction)")
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["source"]].append(row)
    out: dict[str, float] = {"gen/examples": float(len(rows))}
    for source, group in sorted(groups.items()):
        out[f"gen/examples/{source}"] = float(len(group))
    for model in MODELS:
        for metric in METRICS:
            key = f"{model}_{metric}"
            out[f"gen/{model}/{metric}"] = sum(row[key] for row in rows) / len(rows)
            for source, group in sorted(groups.items()):
                out[f"gen/{model}/{source}/{metric}"] = sum(row[key] for row in group) / len(group)
    return out


def cell(text: str, max_chars: int) -> str:
    return _clip(text, max_chars).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def markdown_table(rows: Sequence[dict], limit: int, max_chars: int = 300) -> str:
    """Per-source metrics (base vs sft), then the first ``limit`` examples side by side (cells clipped
    to ``max_chars``; ``|`` escaped, newlines as ``<br>``)."""
    metrics = summary(rows)
    sources = sorted({row["source"] for row in rows})
    lines = ["| source | examples | base exact match | sft exact match | base ROUGE-L | sft ROUGE-L |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, infix, count in [("all", "", metrics["gen/examples"])] + \
            [(s, f"{s}/", metrics[f"gen/examples/{s}"]) for s in sources]:
        values = [metrics[f"gen/{model}/{infix}{metric}"] for metric in METRICS for model in MODELS]
        lines.append(f"| {cell(name, max_chars)} | {int(count)} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", "| id | prompt | reference | base | sft | base ROUGE-L | sft ROUGE-L |",
              "|---|---|---|---|---|---:|---:|"]
    for row in rows[:limit]:
        texts = [cell(row[key], max_chars) for key in ("id", "prompt", "reference", "base", "sft")]
        lines.append("| " + " | ".join(texts) + f" | {row['base_rouge_l']:.3f} | {row['sft_rouge_l']:.3f} |")
    return "\n".join(lines) + "\n"
