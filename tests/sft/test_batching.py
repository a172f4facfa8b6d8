"""Padding and packing SFT examples: a packed example computes exactly what it computes alone, loss included."""
from __future__ import annotations

import random

import pytest
import torch

from pipeline.sft.batching import collate_packed, masked_loss, pack, packing_stats, pad_batch
from pipeline.sft.chat import IGNORE, Encoded
from pipeline.sft.lora import LoraSpec, add_lora
from tests.model.conftest import random_model

VOCAB, CONTEXT, PAD = 64, 32, 0


@pytest.fixture(params=["gpt", "llama"])
def block(request) -> str:
    return request.param


def model_for(block: str):
    return random_model(block, vocab_size=VOCAB, context=CONTEXT)


def example(n: int, seed: int, prompt: int = 0) -> Encoded:
    """n random ids; the first ``prompt`` masked, the rest trained (with prompt=0 even the first token)."""
    ids = random.Random(seed).choices(range(1, VOCAB), k=n)
    return Encoded(ids=ids, labels=[IGNORE] * prompt + ids[prompt:], truncated=False)


def examples() -> list[Encoded]:
    # Best-fit puts them in two rows: [0, 1, 2, 4] (27 tokens) and [3] (9).
    return [example(7, 1, prompt=3), example(12, 2), example(5, 3, prompt=1), example(9, 4, prompt=4),
            example(3, 5)]


def alone(model, e: Encoded) -> torch.Tensor:
    return model(torch.tensor([e.ids]))[0][0]


def packed_logits(model, rows, **drop) -> torch.Tensor:
    batch = collate_packed(rows, PAD, context=CONTEXT)
    kwargs = {k: batch[k] for k in ("positions", "segments") if k not in drop}
    return model(batch["input_ids"], **kwargs)[0]


def spans(row):
    """(example index, start, end) of each example in a packed row."""
    start = 0
    for segment, source in enumerate(row.sources):
        end = start + row.segments.count(segment)
        yield source, start, end
        start = end


@torch.no_grad()
def test_a_packed_example_gives_the_logits_it_gives_alone(block):
    model, exs = model_for(block), examples()
    rows = pack(exs, CONTEXT)
    assert [r.sources for r in rows] == [[0, 1, 2, 4], [3]]
    logits = packed_logits(model, rows)
    for i, row in enumerate(rows):
        for source, start, end in spans(row):
            torch.testing.assert_close(logits[i, start:end], alone(model, exs[source]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("left_out", ["segments", "positions"])
@torch.no_grad()
def test_without_segments_or_positions_the_examples_leak_into_each_other(block, left_out):
    model, exs = model_for(block), examples()
    rows = pack(exs, CONTEXT)
    logits = packed_logits(model, rows, **{left_out: True})
    source, start, end = list(spans(rows[0]))[1]  # the row's second example
    same = torch.allclose(logits[0, start:end], alone(model, exs[source]), atol=1e-5, rtol=1e-5)
    if block == "llama" and left_out == "positions":
        # RoPE scores depend only on the offset between query and key, so the mask alone suffices.
        assert same
    else:  # it attends to the first example, or (gpt) reads its shifted learned positions
        assert not same


@torch.no_grad()
def test_the_packed_loss_is_the_token_weighted_loss_of_the_examples_alone(block):
    model, exs = model_for(block), examples()
    trained = sum(sum(label != IGNORE for label in e.labels[1:]) for e in exs)
    unpacked = sum(masked_loss(model(torch.tensor([e.ids]))[0], torch.tensor([e.labels]), "sum") for e in exs)

    batch = collate_packed(pack(exs, CONTEXT), PAD, context=CONTEXT)
    logits = model(batch["input_ids"], positions=batch["positions"], segments=batch["segments"])[0]
    assert (batch["labels"][:, 1:] != IGNORE).sum() == trained  # no target straddles two examples
    torch.testing.assert_close(masked_loss(logits, batch["labels"], "sum") / trained, unpacked / trained)

    padded = pad_batch(exs, PAD)
    torch.testing.assert_close(masked_loss(model(padded["input_ids"])[0], padded["labels"]), unpacked / trained)


def test_pack_keeps_examples_whole_in_order_and_masks_each_first_label():
    rng = random.Random(0)
    exs = [example(rng.randint(1, CONTEXT), seed, prompt=0) for seed in range(200)]
    rows = pack(exs, CONTEXT)
    assert sorted(s for r in rows for s in r.sources) == list(range(len(exs)))  # each example exactly once
    for row in rows:
        assert len(row.ids) <= CONTEXT and row.sources == sorted(row.sources)
        for segment, (source, start, end) in enumerate(spans(row)):
            e = exs[source]
            assert row.ids[start:end] == e.ids
            assert row.labels[start:end] == [IGNORE] + e.labels[1:]
            assert row.positions[start:end] == list(range(len(e.ids)))
            assert row.segments[start:end] == [segment] * len(e.ids)
    assert [r.sources for r in pack(exs, CONTEXT)] == [r.sources for r in rows]  # deterministic
    stats = packing_stats(exs, rows, CONTEXT)
    assert stats["real_tokens"] == sum(len(e.ids) for e in exs) and stats["fill"] > 0.9 > stats["padded_fill"]


def test_best_fit_fills_the_tightest_row():
    lengths = [20, 22, 8, 12]  # first-fit would put 8 after 20, leaving 12 no room: three rows
    rows = pack([example(n, n) for n in lengths], CONTEXT)
    assert [r.sources for r in rows] == [[0, 3], [1, 2]]


def test_an_example_longer_than_the_context_is_refused():
    with pytest.raises(AssertionError, match="example 1 has 33 tokens"):
        pack([example(3, 0), example(CONTEXT + 1, 1)], CONTEXT)


def test_pad_batch_right_pads_ids_and_masks_the_padding():
    exs = [example(3, 0), example(6, 1, prompt=2)]
    batch = pad_batch(exs, pad_id=PAD)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 6)
    assert batch["input_ids"][0].tolist() == exs[0].ids + [PAD] * 3
    assert batch["labels"][0].tolist() == exs[0].labels + [IGNORE] * 3
    assert batch["labels"][1].tolist() == exs[1].labels


def test_collate_packed_pads_rows_with_their_own_segment():
    rows = pack([example(20, 0), example(25, 1), example(10, 2)], CONTEXT)
    batch = collate_packed(rows, PAD, context=CONTEXT)
    assert all(t.shape == (2, CONTEXT) for t in batch.values())
    assert batch["segments"][0].tolist() == [0] * 20 + [1] * 10 + [-1] * 2
    assert batch["labels"][1, 25:].eq(IGNORE).all() and batch["input_ids"][1, 25:].eq(PAD).all()
    assert collate_packed(rows, PAD)["input_ids"].shape == (2, 30)  # no context: the longest row


def test_packing_stats_compare_with_padding_per_batch():
    exs = [example(n, n) for n in (4, 8, 16, 4)]
    rows = pack(exs, 16)  # [4, 8, 4] and [16]
    stats = packing_stats(exs, rows, 16, batch_size=2)
    assert stats["fill"] == 32 / (2 * 16)
    assert stats["padded_fill"] == 32 / (2 * 8 + 2 * 16)
    assert stats["speedup"] == pytest.approx(48 / 32)


@torch.no_grad()
def test_a_fresh_lora_model_passes_positions_and_segments_through(block):
    model = model_for(block)
    batch = collate_packed(pack(examples(), CONTEXT), PAD, context=CONTEXT)
    kwargs = dict(positions=batch["positions"], segments=batch["segments"])
    expected = model(batch["input_ids"], **kwargs)[0]
    peft_model = add_lora(model, LoraSpec()).eval()
    torch.testing.assert_close(peft_model(batch["input_ids"], **kwargs)[0], expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(peft_model(batch["input_ids"])[0], expected, atol=1e-3)  # the kwargs took effect
