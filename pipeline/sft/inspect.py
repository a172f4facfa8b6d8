"""Training conversations as the model reads them: the chat template's text, the trained tokens marked.

``render_examples`` encodes each source's conversations as the sft stage does and renders the first
few with the trained tokens (the assistant's replies and their end-of-turn token) between two marks,
after the source's counts: records read and skipped as bad, conversations kept, cut to the window,
or dropped. ``python -m pipeline.tools.inspect_sft`` prints it for the configured sources.
"""
from __future__ import annotations

import json
from typing import Iterator, Union

from tokenizers import Tokenizer

from pipeline.sft.chat import IGNORE, ChatTemplate, encode_all, render_masked
from pipeline.sft.data import ReadResult
from pipeline.sft.examples import bad_summary


def render_examples(read: dict[str, ReadResult], tokenizer: Tokenizer, template: Union[str, ChatTemplate],
                    max_tokens: int, bos: str, eos: str, drop_truncated: bool = False, per_source: int = 2,
                    marks: tuple[str, str] = ("[[", "]]")) -> Iterator[str]:
    """Per source: a header with its counts, then its first ``per_source`` encoded conversations, one text each."""
    for name, result in read.items():
        examples, counts = encode_all(result.conversations, tokenizer, template, max_tokens, bos, eos, drop_truncated)
        yield f"\n=== {name}: {len(result.conversations):,} conversations read, bad records: " \
              f"{bad_summary(result) or 'none'}"
        yield f"    encoded: {json.dumps(counts)}"
        for example in examples[:per_source]:
            trained = sum(label != IGNORE for label in example.labels)
            cut = ", cut to the window" if example.truncated else ""
            yield f"--- {example.id}: {len(example.ids)} tokens, {trained} trained{cut}"
            yield render_masked(tokenizer, example, *marks)
