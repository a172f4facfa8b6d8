"""Chat templates, and conversations encoded with a loss mask that trains only the assistant's replies.

The templates are Jinja in transformers' ``chat_template`` convention (``messages``, ``bos_token``,
``eos_token``, ``add_generation_prompt``), so one string serves here and in an exported
``tokenizer_config.json``.

Masking method: the template is rendered once with every message's content replaced by a marker,
which splits the text into template pieces and content slots. Template pieces are tokenized with
the special tokens recognised (``<|im_start|>`` is one token); contents are tokenized with special
token strings read as plain text, so a user who types ``</s>`` or ``<|im_end|>`` cannot end a turn.
Each piece is tokenized on its own and the ids concatenated, so no token straddles a boundary
between prompt and reply: the reply's tokens are those the model would produce after the prompt
that ``add_generation_prompt`` renders. Trained: an assistant content, and the template text after
it up to and including the template's end-of-turn token (``</s>``, ``<|im_end|>``), so the model
learns to stop. Everything else is masked with -100.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Optional, Sequence, Union

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from pipeline.errors import BadInput
from pipeline.sft.data import Conversation, Skip, check_turns

IGNORE = -100  # the label of a token no loss is taken on (torch cross_entropy's ignore_index)

# <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST] {assistant} </s>
# The system prompt is folded into the first user turn, as Llama 2 chat does. The generation prompt
# is the space after [/INST], so a reply's tokens start with its first word, as in training.
LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is not none %}"
    "{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('llama2: a ' + message['role'] + ' message after the first') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ' }}{% endif %}"
)

# <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n
# <|im_start|>assistant\n{assistant}<|im_end|>\n   (no bos: ChatML's own markers open every turn)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # the Jinja template
    end_of_turn: Optional[str]  # the token closing every assistant reply; None: the tokenizer's eos
    special_tokens: tuple[str, ...]  # markers the template writes, which must be single special tokens


class Template(StrEnum):
    chatml = "chatml"
    llama2 = "llama2"


TEMPLATES = {
    "llama2": ChatTemplate("llama2", LLAMA2, None, ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
    "chatml": ChatTemplate("chatml", CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
}


def get_template(template: Union[str, ChatTemplate]) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise BadInput(f"chat template '{template}' is unknown; use one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compiled(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def render(messages: Sequence[dict], template: Union[str, ChatTemplate], bos: str, eos: str,
           add_generation_prompt: bool = False) -> str:
    """The conversation as the model reads it."""
    chat = get_template(template)
    try:
        return _compiled(chat.source).render(messages=list(messages), bos_token=bos, eos_token=eos,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise BadInput(f"chat template '{chat.name}' cannot render the conversation: {e}") from e


# ---------------------------------------------------------------------------------------------
# Special tokens


def _added(tokenizer: Tokenizer) -> set[str]:
    return {t.content for t in tokenizer.get_added_tokens_decoder().values()}


def add_chat_tokens(tokenizer: Tokenizer, template: Union[str, ChatTemplate]) -> list[str]:
    """Add the template's markers the tokenizer lacks as special tokens; return those added, in order
    (new ids at the end of the vocabulary: resize the model's embeddings to ``get_vocab_size()``)."""
    missing = [t for t in get_template(template).special_tokens if t not in _added(tokenizer)]
    if missing:
        tokenizer.add_special_tokens(missing)
    return missing


def _check_tokens(tokenizer: Tokenizer, chat: ChatTemplate, bos: str, eos: str) -> None:
    missing = [t for t in (bos, eos, *chat.special_tokens) if t not in _added(tokenizer)]
    if missing:
        raise BadInput(f"the tokenizer lacks the special tokens {missing} that chat template '{chat.name}' uses; "
                       f"add them with add_chat_tokens (or list them in tokenizer.special_tokens)")


# ---------------------------------------------------------------------------------------------
# Encoding with a loss mask

_SLOT = re.compile("\ue000(\\d+)\ue001")  # private-use characters: never in a template's own text


def _slot(i: int) -> str:
    return f"\ue000{i}\ue001"


def segments(messages: Sequence[dict], chat: ChatTemplate, bos: str, eos: str,
             add_generation_prompt: bool = False) -> list[tuple[str, bool, bool]]:
    """The rendered conversation as consecutive pieces ``(text, is_content, trained)``; joined, they are
    exactly ``render(messages, ...)``."""
    marked = [{"role": m["role"], "content": _slot(i)} for i, m in enumerate(messages)]
    text = render(marked, chat, bos, eos, add_generation_prompt)
    end_of_turn = chat.end_of_turn or eos
    pieces: list[tuple[str, bool, bool]] = []
    after_reply, position, seen = False, 0, []
    for match in list(_SLOT.finditer(text)) + [None]:
        markup = text[position: match.start() if match else len(text)]
        if after_reply:
            cut = markup.find(end_of_turn)
            assert cut >= 0, f"template '{chat.name}' does not close a reply with {end_of_turn!r}: {markup!r}"
            cut += len(end_of_turn)
            pieces += [(markup[:cut], False, True), (markup[cut:], False, False)]
        else:
            pieces.append((markup, False, False))
        if match is None:
            break
        i = int(match.group(1))
        seen.append(i)
        after_reply = messages[i]["role"] == "assistant"
        pieces.append((messages[i]["content"], True, after_reply))
        position = match.end()
    assert seen == list(range(len(messages))), f"template '{chat.name}' must write every content once, in order: {seen}"
    pieces = [p for p in pieces if p[0]]
    assert "".join(p[0] for p in pieces) == render(messages, chat, bos, eos, add_generation_prompt), \
        f"template '{chat.name}' changes the message contents; the loss mask would not match the text"
    return pieces


def _encode_pieces(tokenizer: Tokenizer, pieces: list[tuple[str, bool, bool]]) -> list[list[int]]:
    """Token ids of each piece: special tokens recognised in template text, read as text in contents.

    Flips ``tokenizer.encode_special_tokens`` and restores it, so one tokenizer must not be shared
    by threads encoding at the same time (processes, as datasets.map uses, are fine).
    """
    ids: list[Optional[list[int]]] = [None] * len(pieces)
    before = tokenizer.encode_special_tokens
    try:
        for is_content in (False, True):
            tokenizer.encode_special_tokens = is_content
            which = [k for k, p in enumerate(pieces) if p[1] == is_content]
            encodings = tokenizer.encode_batch([pieces[k][0] for k in which], add_special_tokens=False)
            for k, encoding in zip(which, encodings):
                ids[k] = encoding.ids
    finally:
        tokenizer.encode_special_tokens = before
    return ids  # type: ignore[return-value]


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]  # ids[i] where trained, else IGNORE; not shifted (the model shifts, as in transformers)
    truncated: bool
    id: str = ""  # the conversation's id


def encode_conversation(tokenizer: Tokenizer, conversation: Conversation, template: Union[str, ChatTemplate],
                        max_tokens: int, bos: str, eos: str) -> Optional[Encoded]:
    """Ids and labels of a conversation, cut to its first ``max_tokens`` tokens.

    None when no trained token is left (the cut fell before the first reply): a caller counts it
    as dropped rather than training on an all-masked example.
    """
    assert max_tokens > 0, max_tokens
    chat = get_template(template)
    _check_tokens(tokenizer, chat, bos, eos)
    try:
        check_turns(conversation.messages)
    except Skip as skip:
        raise BadInput(f"conversation {conversation.id}: {skip.reason} {skip.detail}".rstrip()) from skip
    pieces = segments(conversation.messages, chat, bos, eos)
    ids, labels = [], []
    for (_, _, trained), piece_ids in zip(pieces, _encode_pieces(tokenizer, pieces)):
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE] * len(piece_ids)
    truncated = len(ids) > max_tokens
    ids, labels = ids[:max_tokens], labels[:max_tokens]
    if all(label == IGNORE for label in labels):
        return None
    return Encoded(ids, labels, truncated, conversation.id)


def encode_prompt(tokenizer: Tokenizer, messages: Sequence[dict], template: Union[str, ChatTemplate],
                  bos: str, eos: str) -> list[int]:
    """Ids of a conversation that ends with a user turn, followed by the generation prompt: what a
    model fine-tuned with ``encode_conversation`` continues with a reply."""
    chat = get_template(template)
    _check_tokens(tokenizer, chat, bos, eos)
    if not messages or messages[-1].get("role") != "user":
        raise BadInput(f"a prompt for generation must end with a user message, not {messages[-1:]}")
    pieces = segments(messages, chat, bos, eos, add_generation_prompt=True)
    return [i for piece_ids in _encode_pieces(tokenizer, pieces) for i in piece_ids]


def encode_all(conversations: Sequence[Conversation], tokenizer: Tokenizer, template: Union[str, ChatTemplate],
               max_tokens: int, bos: str, eos: str, drop_truncated: bool = False) -> tuple[list[Encoded], dict[str, int]]:
    """Encode every conversation; counts: kept, truncated (kept ones that were cut), dropped_no_trained_tokens,
    dropped_too_long (with ``drop_truncated``: cut ones are dropped, not kept), and the kept examples' tokens
    and trained_tokens."""
    examples: list[Encoded] = []
    counts = {"kept": 0, "truncated": 0, "dropped_no_trained_tokens": 0, "dropped_too_long": 0, "tokens": 0,
              "trained_tokens": 0}
    for conversation in conversations:
        encoded = encode_conversation(tokenizer, conversation, template, max_tokens, bos, eos)
        if encoded is None:
            counts["dropped_no_trained_tokens"] += 1
            continue
        if drop_truncated and encoded.truncated:
            counts["dropped_too_long"] += 1
            continue
        examples.append(encoded)
        counts["kept"] += 1
        counts["truncated"] += encoded.truncated
        counts["tokens"] += len(encoded.ids)
        counts["trained_tokens"] += sum(label != IGNORE for label in encoded.labels)
    return examples, counts


def render_masked(tokenizer: Tokenizer, encoded: Encoded, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The example's text with every trained run of tokens wrapped in ``open_mark``/``close_mark``
    (pass ANSI colour codes for a terminal)."""
    out, run, run_trained = [], [], False

    def flush():
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{open_mark}{text}{close_mark}" if run_trained else text)

    for token, label in zip(encoded.ids, encoded.labels):
        trained = label != IGNORE
        if trained != run_trained:
            flush()
            run, run_trained = [], trained
        run.append(token)
    flush()
    return "".join(out)
