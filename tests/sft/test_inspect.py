"""The inspection of training conversations marks exactly the trained tokens and counts each source."""
from __future__ import annotations

from pipeline.sft.data import Conversation, ReadResult
from pipeline.sft.inspect import render_examples
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer


def test_the_replies_and_their_end_of_turn_are_marked():
    tokenizer = byte_tokenizer(SpecialTokens().all())
    chats = [Conversation([{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}], "mine",
                          f"mine:{i}") for i, w in enumerate(["hi", "bye", "ok"])]
    read = {"mine": ReadResult(chats, bad={"missing_output": 2})}
    lines = list(render_examples(read, tokenizer, "chatml", 256, "<s>", "</s>", per_source=2, marks=("<<", ">>")))
    assert lines[0] == "\n=== mine: 3 conversations read, bad records: missing_output 2"
    assert '"kept": 3' in lines[1]
    assert lines[2].startswith("--- mine:0: ") and lines[2].endswith(" trained")
    assert lines[3] == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n<<hi<|im_end|>>>\n"
    assert len(lines) == 2 + 2 * 2  # per_source conversations of the source
