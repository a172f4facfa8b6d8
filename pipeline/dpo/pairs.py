"""Human preference pairs read into one shape, split, and encoded with the chat template of SFT.

A pair is a prompt (chat messages ending with a user turn) and two assistant replies to it, the one
people preferred (``chosen``) and the other (``rejected``). Two readers:

- ``hh_rlhf``: Anthropic HH-RLHF records ``{"chosen", "rejected"}``, each a whole dialogue in the
  ``\\n\\nHuman: ...\\n\\nAssistant: ...`` format. The two dialogues must be the same up to their last
  assistant turn, which is the pair's two replies.
- ``oasst_pairs``: OpenAssistant message trees. Under every message, each two usable assistant replies
  with different human ``rank`` (0 is best) make one pair, the better-ranked chosen; the prompt is the
  path from the tree's root down to that message.

Bad records are counted by reason, as the SFT readers do (``pipeline.sft.data.read_records``): a missing
field, a dialogue that is not in the format, prompts that differ, identical replies, a tree with no ranked
siblings. A pair too long for the window is counted and left out, never cut.

Encoding: each reply is the prompt and that reply rendered as one conversation; only the reply's tokens
(and the template's end-of-turn token after it) are scored, every prompt token is masked. The held-out
split hashes the prompt, so the sibling pairs of one OASST prompt all land on the same side.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Protocol, Union

from tokenizers import Tokenizer

from pipeline.errors import BadInput
from pipeline.sft.chat import IGNORE, ChatTemplate, Encoded, encode_conversation, encode_prompt
from pipeline.sft.data import (ROLE_ALIASES, Conversation, ReadResult, Skip, check_turns, content_digest, own_id,
                               read_records, read_with, text_field, usable_message)

NO_LIMIT = 2**31  # encode without cutting: a pair longer than the window is left out whole


@dataclass
class Pair:
    prompt: list[dict]  # chat messages, the last a user turn
    chosen: str
    rejected: str
    source: str
    id: str

    def conversation(self, reply: str) -> Conversation:
        return Conversation([*self.prompt, {"role": "assistant", "content": reply}], self.source, self.id)


def _pair(prompt: list[dict], chosen: str, rejected: str, pair_id: str) -> Pair:
    """A checked pair: the prompt and each reply make a valid conversation, and the replies differ."""
    check_turns([*prompt, {"role": "assistant", "content": chosen}])
    check_turns([*prompt, {"role": "assistant", "content": rejected}])
    if chosen.strip() == rejected.strip():
        raise Skip("identical_replies", pair_id)
    return Pair(prompt, chosen, rejected, source="", id=pair_id)


# ---------------------------------------------------------------------------------------------
# Readers

_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_dialogue(text: str) -> list[dict]:
    """``\\n\\nHuman: a\\n\\nAssistant: b`` as messages ``[user a, assistant b]``; contents stripped."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise Skip("not_a_dialogue", text[:60])
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def read_hh_rlhf(path: str, name: str) -> ReadResult:
    """HH-RLHF ``{chosen, rejected}`` dialogues that share everything but the last assistant turn."""

    def parse(record: dict, prefix: str, index: int) -> Iterator[Pair]:
        texts = [text_field(record, key) for key in ("chosen", "rejected")]  # both present before either is parsed
        chosen, rejected = (hh_dialogue(text) for text in texts)
        for messages in (chosen, rejected):
            if messages[-1]["role"] != "assistant":
                raise Skip("no_final_assistant", "/".join(m["role"] for m in messages))
        if chosen[:-1] != rejected[:-1]:
            raise Skip("prompts_differ")
        yield _pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], f"{prefix}:{index}")

    return read_records(path, name, parse)


def _replies(message: dict) -> list:
    replies = message.get("replies") or []
    if not isinstance(replies, list):
        raise Skip("not_list_replies", type(replies).__name__)
    return replies


def _ranked_replies(message: dict) -> list[dict]:
    replies = [r for r in _replies(message) if isinstance(r, dict) and usable_message(r, True)]
    return [r for r in replies if isinstance(r.get("rank"), int) and not isinstance(r.get("rank"), bool)]


def read_oasst_pairs(path: str, name: str) -> ReadResult:
    """OpenAssistant trees: every two ranked sibling assistant replies (usable, not model-written) make a
    pair, the lower rank chosen; ids ``<source>:<tree>:<parent message>:<chosen rank>><rejected rank>``."""

    def parse(record: dict, prefix: str, index: int) -> Iterator[Union[Pair, Skip]]:
        root = record.get("prompt")
        if not isinstance(root, dict):
            raise Skip("missing_prompt")
        if not usable_message(root, True):
            raise Skip("synthetic" if root.get("synthetic") else "deleted_or_rejected")
        tree = own_id(record.get("message_tree_id"), index)
        found = visited = 0
        stack: list[tuple[dict, list[dict]]] = [(root, [])]
        while stack:
            message, path = stack.pop()
            if not usable_message(message, True):
                continue
            role = ROLE_ALIASES.get(str(message.get("role")))
            if role is None:
                yield Skip("unknown_role", repr(message.get("role")))
                continue
            path = [*path, {"role": role, "content": message.get("text")}]
            replies = _ranked_replies(message) if role == "user" else []
            parent = str(message.get("message_id") or f"m{visited}")[:8]  # the k-th message visited, without an id
            for i, first in enumerate(replies):
                for second in replies[i + 1:]:
                    if first["rank"] == second["rank"]:
                        continue
                    better, worse = (first, second) if first["rank"] < second["rank"] else (second, first)
                    pair_id = f"{prefix}:{tree}:{parent}:{better['rank']}>{worse['rank']}"
                    try:
                        yield _pair(path, text_field(better, "text"), text_field(worse, "text"), pair_id)
                        found += 1
                    except Skip as skip:
                        yield skip
            stack += [(r, path) for r in reversed(_replies(message)) if isinstance(r, dict)]
            visited += 1
        if not found:
            yield Skip("no_ranked_siblings", str(tree))

    return read_records(path, name, parse)


READERS: dict[str, Callable[..., ReadResult]] = {"hh_rlhf": read_hh_rlhf, "oasst_pairs": read_oasst_pairs}


def read_pairs(format: str, path: str, name: str, **options) -> ReadResult:
    """One source read by the reader of ``format``; ``result.conversations`` holds its Pairs."""
    return read_with(READERS, format, path, name, **options)


# ---------------------------------------------------------------------------------------------
# Encoding and the held-out split


@dataclass
class EncodedPair:
    chosen: Encoded  # the prompt and the chosen reply; labels only on the reply
    rejected: Encoded
    pair: Pair

    @property
    def ids(self) -> list[int]:
        """Both rows' tokens (what one pair costs a forward pass)."""
        return self.chosen.ids + self.rejected.ids


def encode_reply(tokenizer: Tokenizer, pair: Pair, reply: str, template: Union[str, ChatTemplate], bos: str,
                 eos: str) -> Encoded:
    """The prompt and ``reply`` as one conversation, only the reply's tokens trained (earlier assistant turns of
    the prompt are masked too)."""
    full = encode_conversation(tokenizer, pair.conversation(reply), template, NO_LIMIT, bos, eos)
    prompt = encode_prompt(tokenizer, pair.prompt, template, bos, eos)
    assert full is not None and full.ids[:len(prompt)] == prompt, \
        f"pair {pair.id}: the rendered prompt is not a prefix of the rendered conversation"
    labels = [IGNORE] * len(prompt) + full.labels[len(prompt):]
    return Encoded(full.ids, labels, False, pair.id)


def encode_pairs(pairs: list[Pair], tokenizer: Tokenizer, template: Union[str, ChatTemplate], max_tokens: int,
                 bos: str, eos: str) -> tuple[list[EncodedPair], dict[str, int]]:
    """Encoded pairs whose two conversations both fit ``max_tokens``; counts: kept, dropped_too_long, tokens."""
    kept, counts = [], {"kept": 0, "dropped_too_long": 0, "tokens": 0}
    for pair in pairs:
        chosen, rejected = (encode_reply(tokenizer, pair, reply, template, bos, eos)
                            for reply in (pair.chosen, pair.rejected))
        if max(len(chosen.ids), len(rejected.ids)) > max_tokens:
            counts["dropped_too_long"] += 1
            continue
        kept.append(EncodedPair(chosen, rejected, pair))
        counts["kept"] += 1
        counts["tokens"] += len(chosen.ids) + len(rejected.ids)
    return kept, counts


def is_held_out(pair: Pair, val_fraction: float, seed: int) -> bool:
    """By a hash of the prompt: every pair of one prompt is on the same side."""
    return content_digest(Conversation(pair.prompt, "", ""), seed) < int(val_fraction * 2**64)


class PreferenceSource(Protocol):
    format: str
    path: str
    options: dict


@dataclass
class PreferenceData:
    train: list[EncodedPair]  # every source's training pairs, in reading order (batches draw them by seed)
    val: dict[str, list[EncodedPair]]  # held out, per source that kept any, at most val_max_per_source each
    counts: dict[str, dict] = field(default_factory=dict)  # source -> read, bad, train/val encode counts
    bad_examples: dict[str, list[dict]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {}
        for name, c in self.counts.items():
            out[f"data/{name}/pairs_read"] = c["read"]
            out[f"data/{name}/bad_records"] = sum(c["bad"].values())
            out[f"data/{name}/train_pairs"] = c["train"]["kept"]
            out[f"data/{name}/val_pairs"] = c["val"]["kept"]
            out[f"data/{name}/dropped_too_long"] = c["train"]["dropped_too_long"] + c["val"]["dropped_too_long"]
        out["data/train_pairs"] = len(self.train)
        return out


def build_pairs(sources: Mapping[str, PreferenceSource], tokenizer: Tokenizer, template: Union[str, ChatTemplate],
                max_tokens: int, bos: str, eos: str, seed: int, val_fraction: float,
                val_max_per_source: int) -> PreferenceData:
    """Every source read, split by prompt hash and encoded; a source or split left empty is an error naming it."""
    if not sources:
        raise BadInput("dpo.sources is empty: name preference data, e.g. "
                       "+dpo.sources.hh={format: hh_rlhf, path: <file>}")
    train, val, counts, bad_examples = [], {}, {}, {}
    for name, source in sources.items():
        result = read_pairs(source.format, source.path, name, **source.options)
        if result.bad:
            print(f"dpo: {name}: skipped {sum(result.bad.values())} records or pairs "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(result.bad.items()))})")
            bad_examples[name] = result.bad_examples
        held = [is_held_out(p, val_fraction, seed) for p in result.conversations]
        train_part, train_counts = encode_pairs([p for p, h in zip(result.conversations, held) if not h], tokenizer,
                                                template, max_tokens, bos, eos)
        val_part, val_counts = encode_pairs([p for p, h in zip(result.conversations, held) if h], tokenizer,
                                            template, max_tokens, bos, eos)
        counts[name] = {"read": len(result.conversations), "bad": dict(Counter(result.bad)), "train": train_counts,
                        "val": val_counts}
        train += train_part
        if val_part:
            val[name] = val_part[:val_max_per_source]
        too_long = train_counts["dropped_too_long"] + val_counts["dropped_too_long"]
        print(f"dpo: {name}: {len(result.conversations):,} pairs read, {too_long:,} longer than {max_tokens} tokens "
              f"left out; {train_counts['kept']:,} train, {val_counts['kept']:,} held out")
    if not train:
        raise BadInput(f"no training pair fits {max_tokens} tokens: {counts}")
    if not val:
        raise BadInput(f"no held-out pair is left (dpo.val_fraction={val_fraction}): {counts}; raise val_fraction")
    return PreferenceData(train, val, counts, bad_examples)
