"""Instruction data read into one shape, a list of chat messages, and mixed into a training set.

Every reader takes a JSON array file or a JSONL file (optionally gzipped; a directory or glob of
them also works) and a source name, and returns the good conversations plus a count of the bad
records by reason. A bad record (invalid JSON, a missing or empty field, a non-string content,
roles out of order) is counted and skipped; only a file that cannot be read, or that yields no
good record at all, is an error.

A conversation is ``[system?] user assistant (user assistant)*``: an optional system message,
then user and assistant messages alternating, ending with an assistant reply (the text trained on).
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

from pipeline.data.sources import resolve_files
from pipeline.errors import BadInput

ROLES = ("system", "user", "assistant")
# Other datasets' names for the roles: ShareGPT (human/gpt), OpenAssistant (prompter).
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
                "assistant": "assistant", "gpt": "assistant"}
MAX_BAD_EXAMPLES = 5  # bad records kept as examples per read, for the error message and the manifest


@dataclass
class Conversation:
    messages: list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]
    source: str
    id: str  # "<source>:<record id or index>", stable across reads of the same file


@dataclass
class ReadResult:
    conversations: list[Conversation]
    bad: dict[str, int] = field(default_factory=dict)  # reason -> number of records skipped for it
    bad_examples: list[dict] = field(default_factory=list)  # the first few: {"where", "reason", "detail"}


class Skip(Exception):
    """A record (or one conversation of it) is unusable; the reader counts ``reason`` and goes on."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


Parsed = Union[Conversation, Skip]
Parser = Callable[[dict, str, int], Iterable[Parsed]]  # (record, id prefix, index) -> conversations or skips


# ---------------------------------------------------------------------------------------------
# Files and records


def _is_instruction_file(path: str) -> bool:
    name = path.lower().removesuffix(".gz")
    return name.endswith(".json") or name.endswith(".jsonl")


def _read_text(path: str) -> str:
    try:
        if path.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read()
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from e
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise BadInput(f"{path}: cannot be read ({e})") from e


def _records(path: str) -> Iterator[tuple[str, int, object]]:
    """(where, index, record) for every record; ``record`` is a Skip for a line that is not JSON.

    A file whose first character is ``[`` is one JSON array (where = ``file[index]``); any other
    file is JSON lines (where = ``file:line``). ``index`` counts records, bad ones included, so a
    record keeps its index when a bad record before it is fixed.
    """
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}: line {e.lineno}: invalid JSON ({e.msg}); a file starting with '[' must be "
                           f"one JSON array") from e
        for index, record in enumerate(records):
            yield f"{path}[{index}]", index, record
        return
    index = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = Skip("invalid_json", e.msg)
        yield f"{path}:{lineno}", index, record
        index += 1


def read_records(path: str, name: str, parse: Parser) -> ReadResult:
    """Run ``parse`` over every record of the files at ``path``, counting the records it skips.

    ``parse`` yields Conversations, or any item with a ``source`` attribute (the preference pairs of dpo).
    """
    files = resolve_files(name, path, accept=_is_instruction_file)
    conversations, bad, examples = [], Counter(), []
    for file in files:
        # Ids name the file when a source has several, so adding a file does not renumber the others.
        prefix = name if len(files) == 1 else f"{name}:{Path(file).name}"
        for where, index, record in _records(file):
            if isinstance(record, Skip):
                items: Iterable[Parsed] = [record]
            elif not isinstance(record, dict):
                items = [Skip("not_an_object", type(record).__name__)]
            else:
                try:
                    items = list(parse(record, prefix, index))
                except Skip as skip:
                    items = [skip]
            for item in items:
                if isinstance(item, Skip):
                    bad[item.reason] += 1
                    if len(examples) < MAX_BAD_EXAMPLES:
                        examples.append({"where": where, "reason": item.reason, "detail": item.detail})
                else:
                    item.source = name
                    conversations.append(item)
    if not conversations:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in bad.most_common()) or "no records"
        first = f"; first: {examples[0]['where']}: {examples[0]['reason']} {examples[0]['detail']}".rstrip() \
            if examples else ""
        raise BadInput(f"source '{name}': {path} has no usable record ({reasons}{first}); check the format and "
                       f"field names given for it")
    return ReadResult(conversations, dict(bad), examples)


def text_field(record: dict, key: str, *, required: bool = True) -> str:
    """A string field; missing (if required), non-string and blank values raise Skip."""
    if key not in record or record[key] is None:
        if required:
            raise Skip(f"missing_{key}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise Skip(f"not_string_{key}", type(value).__name__)
    if required and not value.strip():
        raise Skip(f"empty_{key}")
    return value


def own_id(value: object, index: int) -> object:
    """The record's own id when it has a usable one, else its index in the file."""
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) else index


def _user_turn(instruction: str, input_text: str) -> str:
    return instruction + "\n\n" + input_text if input_text.strip() else instruction


def check_turns(messages: list) -> None:
    """Raise Skip unless ``messages`` is ``[system?] user assistant (user assistant)*`` of non-empty strings."""
    if not messages:
        raise Skip("no_messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise Skip("bad_message", f"message {i} is not {{role, content}}")
        if message["role"] not in ROLES:
            raise Skip("unknown_role", repr(message["role"]))
        if not isinstance(message["content"], str):
            raise Skip("not_string_content", f"message {i}: {type(message['content']).__name__}")
        if not message["content"].strip():
            raise Skip("empty_content", f"message {i} ({message['role']})")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * ((len(turns) + 1) // 2)
    roles = [m["role"] for m in turns]
    if roles != expected[:len(roles)]:
        raise Skip("roles_out_of_order", "/".join(m["role"] for m in messages))
    if not roles or roles[-1] != "assistant":
        raise Skip("no_final_assistant", "/".join(m["role"] for m in messages))


def _conversation(messages: list[dict], conversation_id: str) -> Conversation:
    check_turns(messages)
    return Conversation(messages, source="", id=conversation_id)  # read_records sets the source


def _exchange(user: str, assistant: str, conversation_id: str) -> Conversation:
    return _conversation([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                         conversation_id)


# ---------------------------------------------------------------------------------------------
# Readers, one per format


def read_alpaca(path: str, name: str, instruction_field: str = "instruction", input_field: str = "input",
                output_field: str = "output") -> ReadResult:
    """Alpaca records ``{instruction, input?, output}``; the user turn is the instruction, then a blank
    line and the input when there is one."""

    def parse(record: dict, prefix: str, index: int) -> Iterator[Parsed]:
        instruction = text_field(record, instruction_field)
        input_text = text_field(record, input_field, required=False)
        yield _exchange(_user_turn(instruction, input_text), text_field(record, output_field), f"{prefix}:{index}")

    return read_records(path, name, parse)


def read_prompt_response(path: str, name: str, prompt_field: str = "prompt",
                         response_field: Optional[str] = None,
                         strip_suffix: Optional[str] = "<|endoftext|>") -> ReadResult:
    """Single exchanges ``{prompt, completion}`` or ``{prompt, response}``.

    ``response_field`` None takes ``completion``, else ``response``. ``strip_suffix`` is removed
    from the end of responses: the P3 files end every completion with GPT-2's ``<|endoftext|>``,
    which the chat template's own end-of-turn token replaces.
    """

    def parse(record: dict, prefix: str, index: int) -> Iterator[Parsed]:
        key = response_field or ("completion" if "completion" in record else "response")
        response = text_field(record, key, required=False)
        if key not in record:
            raise Skip(f"missing_{key}")
        if strip_suffix and response.endswith(strip_suffix):
            response = response[: -len(strip_suffix)]
        if not response.strip():
            raise Skip(f"empty_{key}")
        yield _exchange(text_field(record, prompt_field), response, f"{prefix}:{index}")

    return read_records(path, name, parse)


def read_conversations(path: str, name: str, messages_field: str = "messages", role_field: str = "role",
                       content_field: str = "content", id_field: Optional[str] = "id") -> ReadResult:
    """Records holding a list of messages, e.g. ``{"messages": [{"role", "content"}, ...]}`` or ShareGPT's
    ``{"conversations": [{"from": "human", "value": ...}]}`` (messages_field=conversations,
    role_field=from, content_field=value). Roles human/prompter are user, gpt is assistant.
    The record's ``id_field`` names the conversation when present, else its index."""

    def parse(record: dict, prefix: str, index: int) -> Iterator[Parsed]:
        raw = record.get(messages_field)
        if raw is None:
            raise Skip(f"missing_{messages_field}")
        if not isinstance(raw, list):
            raise Skip(f"not_list_{messages_field}", type(raw).__name__)
        messages = []
        for i, message in enumerate(raw):
            if not isinstance(message, dict) or role_field not in message or content_field not in message:
                raise Skip("bad_message", f"message {i} lacks '{role_field}' or '{content_field}'")
            role = ROLE_ALIASES.get(str(message[role_field]).lower())
            if role is None:
                raise Skip("unknown_role", repr(message[role_field]))
            messages.append({"role": role, "content": message[content_field]})
        record_id = record.get(id_field) if id_field else None
        yield _conversation(messages, f"{prefix}:{own_id(record_id, index)}")

    return read_records(path, name, parse)


def usable_message(message: dict, skip_synthetic: bool) -> bool:
    return not (message.get("deleted") or message.get("review_result") is False
                or (skip_synthetic and message.get("synthetic")))


def best_path(root: dict, skip_synthetic: bool = True) -> list[dict]:
    """The messages from ``root`` down the best-ranked replies to a leaf.

    At each message the next one is the usable reply with the lowest ``rank`` (0 is best); replies
    without a rank come after ranked ones, ties keep the file's order. Deleted replies, replies that
    failed review and (with ``skip_synthetic``) model-written ones are not usable. A greedy walk: it
    keeps the best reply at every step, not the longest conversation.
    """
    path, message = [root], root
    while True:
        replies = [r for r in message.get("replies") or [] if isinstance(r, dict) and usable_message(r, skip_synthetic)]
        if not replies:
            return path
        message = min(enumerate(replies),
                      key=lambda ir: (ir[1].get("rank") is None, ir[1].get("rank") or 0, ir[0]))[1]
        path.append(message)


def read_oasst_tree(path: str, name: str, skip_synthetic: bool = True) -> ReadResult:
    """OpenAssistant message trees ``{message_tree_id, prompt: {text, role, replies: [...]}}``, one
    conversation per tree: the best-ranked path (``best_path``), cut after its last assistant reply.

    One path per tree, not every root-to-leaf path: the trees' branches repeat their prefixes, and
    the ranked-best path is what OpenAssistant's own SFT sets take. ``skip_synthetic`` drops messages
    a model wrote (the whole tree when its prompt is one).
    """

    def parse(record: dict, prefix: str, index: int) -> Iterator[Parsed]:
        root = record.get("prompt")
        if not isinstance(root, dict):
            raise Skip("missing_prompt")
        if not usable_message(root, skip_synthetic):
            raise Skip("synthetic" if root.get("synthetic") else "deleted_or_rejected")
        messages = []
        for message in best_path(root, skip_synthetic):
            role = ROLE_ALIASES.get(str(message.get("role")))
            if role is None:
                raise Skip("unknown_role", repr(message.get("role")))
            messages.append({"role": role, "content": message.get("text")})
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()  # a prompt nobody answered
        if not messages:
            raise Skip("no_assistant_reply")
        yield _conversation(messages, f"{prefix}:{own_id(record.get('message_tree_id'), index)}")

    return read_records(path, name, parse)


def read_gsm8k(path: str, name: str) -> ReadResult:
    """GSM8K ``{question, answer}``; the reply is the whole answer: the reasoning, calculator notes
    ``<<48/2=24>>`` included, and the final ``#### <number>`` line."""

    def parse(record: dict, prefix: str, index: int) -> Iterator[Parsed]:
        answer = text_field(record, "answer")
        if gsm8k_final(answer) is None:
            raise Skip("no_final_answer", answer[-60:])
        yield _exchange(text_field(record, "question"), answer, f"{prefix}:{index}")

    return read_records(path, name, parse)


def gsm8k_final(answer: str) -> Optional[str]:
    """The final answer after the last ``####``, thousands separators removed ("10,000" -> "10000");
    None when there is no ``####`` or nothing after it (a generated answer may lack one)."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return final or None


def read_self_instruct(path: str, name: str) -> ReadResult:
    """Self-instruct tasks ``{id, instruction, instances: [{input, output}]}`` (seed_tasks.jsonl, and
    user_oriented_instructions.jsonl alike), one conversation per instance, id ``<source>:<task id>:<k>``."""

    def parse(record: dict, prefix: str, index: int) -> Iterator[Parsed]:
        instruction = text_field(record, "instruction")
        instances = record.get("instances")
        if not isinstance(instances, list) or not instances:
            raise Skip("missing_instances")
        conversation_id = f"{prefix}:{own_id(record.get('id'), index)}"
        for k, instance in enumerate(instances):
            try:
                if not isinstance(instance, dict):
                    raise Skip("not_an_object", f"instance {k}")
                user = _user_turn(instruction, text_field(instance, "input", required=False))
                yield _exchange(user, text_field(instance, "output"), f"{conversation_id}:{k}")
            except Skip as skip:  # one bad instance does not cost the task its other instances
                yield skip

    return read_records(path, name, parse)


READERS: dict[str, Callable[..., ReadResult]] = {
    "alpaca": read_alpaca,
    "prompt_response": read_prompt_response,
    "conversations": read_conversations,
    "oasst_tree": read_oasst_tree,
    "gsm8k": read_gsm8k,
    "self_instruct": read_self_instruct,
}


def read_with(readers: Mapping[str, Callable[..., ReadResult]], format: str, path: str, name: str,
              **options) -> ReadResult:
    """Read one source with the reader of ``format`` in ``readers``; ``options`` are that reader's keyword
    arguments (an unknown format or option is an error naming the source)."""
    reader = readers.get(format)
    if reader is None:
        raise BadInput(f"source '{name}': format '{format}' is unknown; use one of {', '.join(readers)}")
    accepted = list(inspect.signature(reader).parameters)[2:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BadInput(f"source '{name}': format '{format}' takes no option {', '.join(unknown)} "
                       f"(it takes: {', '.join(accepted) or 'none'})")
    return reader(path, name, **options)


def read_source(format: str, path: str, name: str, **options) -> ReadResult:
    """Read one instruction source with the reader of ``format`` (``READERS``)."""
    return read_with(READERS, format, path, name, **options)


# ---------------------------------------------------------------------------------------------
# Held-out split and mixture


def content_digest(conversation: Conversation, seed: int) -> int:
    """A 64-bit hash of the messages (not the source or id), keyed by the seed: the same text lands
    in the same split whichever source it came from and however the sources are weighted."""
    raw = json.dumps(conversation.messages, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, key=str(seed).encode()).digest(), "little")


def is_held_out(conversation: Conversation, val_fraction: float, seed: int) -> bool:
    return content_digest(conversation, seed) < int(val_fraction * 2**64)


@dataclass
class Mixture:
    train: list[Conversation]  # shuffled; a source with weight w appears round(w * its train part) times
    val: dict[str, list[Conversation]]  # held out, per source, in reading order
    counts: dict[str, dict[str, int]]  # source -> {read, val, train_pool, train}


def mixture(sources: dict[str, ReadResult], weights: dict[str, float], val_fraction: float,
            seed: int) -> Mixture:
    """Hold out ``val_fraction`` of every source by content hash, then sample the training set.

    Source s with weight w contributes ``round(w * n_s)`` examples, n_s being its training part:
    w < 1 samples that many without replacement, w > 1 takes whole passes plus a sample for the
    remainder, w = 0 leaves it out of training (its held-out part stays). Each source samples from
    its own seeded stream, so changing one weight does not change what the others contribute.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise BadInput(f"val_fraction={val_fraction} must be in [0, 1)")
    missing, extra = sorted(set(sources) - set(weights)), sorted(set(weights) - set(sources))
    if missing or extra:
        raise BadInput(f"weights must name exactly the sources: missing {missing}, unknown {extra}")
    for name, w in weights.items():
        if not w >= 0:
            raise BadInput(f"weights.{name}={w} must be >= 0")
    train, val, counts = [], {}, {}
    for name, result in sources.items():
        pool = []
        val[name] = []
        for conversation in result.conversations:
            (val[name] if is_held_out(conversation, val_fraction, seed) else pool).append(conversation)
        target = round(weights[name] * len(pool)) if pool else 0
        passes, remainder = divmod(target, len(pool)) if pool else (0, 0)
        rng = random.Random(f"{seed}:{name}")
        picked = pool * passes + rng.sample(pool, remainder)
        assert len(picked) == target, (name, len(picked), target)
        train.extend(picked)
        counts[name] = {"read": len(result.conversations), "val": len(val[name]), "train_pool": len(pool),
                        "train": len(picked)}
    if not train:
        raise BadInput(f"the mixture has no training example (counts: {counts}); raise a weight or lower val_fraction")
    random.Random(seed).shuffle(train)
    return Mixture(train, val, counts)
