"""The sliding-window scorer: every token scored once, with the context the stride promises."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.evaluate.perplexity import Totals, score_documents, windows
from pipeline.model.gpt import GPT, ModelConfig


@pytest.mark.parametrize("length,context,stride", [(2, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 3), (50, 8, 8), (17, 4, 1)])
def test_windows_score_every_token_once_with_enough_history(length, context, stride):
    scored = []
    for w in windows(length, context, stride):
        assert w.end - 1 - w.begin <= context and w.begin < w.first_target < w.end
        scored += range(w.first_target, w.end)
        # A scored id sees everything from the window's start: after the first window, at least
        # context - stride + 1 ids; in the first, everything before it.
        assert w.first_target - w.begin >= (min(context - stride + 1, length) if scored[0] != w.first_target else 1)
    assert scored == list(range(1, length)), "ids 1..length-1 (the prefix is context only), each exactly once"


def _full_nll(model, ids: list[int], prefix: int) -> float:
    seq = torch.tensor([[prefix, *ids]])
    with torch.no_grad():
        logits = model(seq[:, :-1])[0]
    return torch.nn.functional.cross_entropy(logits[0], seq[0, 1:], reduction="sum").item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, context=16, vocab_size=50)).eval()


def test_documents_within_the_context_match_one_forward_pass_at_any_stride(model):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, n).tolist() for n in (1, 5, 16)]  # the prefix and all but the last id fit in 16
    expected = [_full_nll(model, d, 0) for d in docs]
    for stride in (1, 7, 16):
        scores = score_documents(lambda x: model(x)[0], docs, [10, 10, 10], 0, context=16, stride=stride, batch_size=2)
        assert scores.nll == pytest.approx(expected, rel=1e-5)
        assert scores.tokens.tolist() == [1, 5, 16] and scores.windows == 3


def test_long_documents_get_more_context_with_a_smaller_stride(model):
    doc = np.random.default_rng(1).integers(1, 50, 200).tolist()
    disjoint = score_documents(lambda x: model(x)[0], [doc], [200], 0, context=16, stride=16)
    sliding = score_documents(lambda x: model(x)[0], [doc], [200], 0, context=16, stride=4)
    assert disjoint.tokens[0] == sliding.tokens[0] == 200
    assert sliding.windows > disjoint.windows
    assert disjoint.nll[0] != pytest.approx(sliding.nll[0], rel=1e-6), "the windows give tokens different history"

    # The same sum computed by hand: each window's new tokens, conditioned on the window's start.
    # The same sum token by token: the first 16 ids from everything before them; after that, ids come
    # in groups of 4, each window reading the 16 ids before its group's last: 13, 14, 15, 16 ids of history.
    seq = [0, *doc]
    total = 0.0
    for i in range(1, len(seq)):
        history = i if i <= 16 else 13 + (i - 17) % 4
        with torch.no_grad():
            logp = model(torch.tensor([seq[i - history:i]]))[0][0, -1].log_softmax(-1)
        total -= logp[seq[i]].item()
    assert sliding.nll[0] == pytest.approx(total, rel=1e-5)


def test_totals_define_perplexity_and_bits_per_byte():
    t = Totals(nll=100.0, tokens=50, bytes=200, documents=2)
    assert t.loss == 2.0 and t.ppl == pytest.approx(math.exp(2.0))
    assert t.bpb == pytest.approx(100.0 / math.log(2) / 200)
    t.add(Totals(nll=20.0, tokens=10, bytes=40, documents=1))
    assert (t.tokens, t.bytes, t.documents) == (60, 240, 3) and t.loss == pytest.approx(2.0)
    assert math.isnan(Totals().loss) and math.isnan(Totals().bpb)
