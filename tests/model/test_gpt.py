"""The model's parameter count (N as the scaling-law literature counts it), FLOPs and saved weights."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.gpt import GPT, ModelConfig, flops_per_token, load_model, non_embedding_params, save_model
from tests.model.conftest import random_model


def _on_meta(**shape) -> GPT:
    with torch.device("meta"):  # the shape only: no memory, no init cost
        return GPT(ModelConfig(vocab_size=4096, **shape))


def test_non_embedding_params_of_the_gpt1_shape_match_12_layers_d_squared():
    L, d = 12, 768
    model = _on_meta(block="gpt", n_layer=L, n_head=12, d_model=d, d_ff=4 * d, context=512)
    n = non_embedding_params(model)
    # 12 L d^2 counts the weight matrices; biases and norms add 13 d per layer and 2 d at the end.
    assert n == 12 * L * d * d + L * 13 * d + 2 * d
    assert abs(n - 12 * L * d * d) / (12 * L * d * d) < 2e-3
    assert sum(p.numel() for p in model.parameters()) == n + 4096 * d + 512 * d  # tied output adds nothing


def test_llama_block_counts_swiglu_and_has_no_position_table():
    L, d, ff = 4, 128, 344
    model = _on_meta(block="llama", n_layer=L, n_head=4, d_model=d, d_ff=ff, context=128)
    assert model.pos_emb is None
    assert non_embedding_params(model) == L * (4 * d * d + 3 * d * ff + 2 * d) + d


def test_flops_per_token_is_6n_plus_attention():
    cfg = ModelConfig(n_layer=2, d_model=64, context=32, vocab_size=10)
    assert flops_per_token(cfg, 1000) == 6 * 1000 + 12 * 2 * 32 * 64


def test_saved_model_loads_with_identical_logits(block, tmp_path):
    model = random_model(block)
    save_model(model, tmp_path / "model.pt")
    again = load_model(tmp_path).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 10))
    assert again.cfg == model.cfg
    assert torch.equal(again(ids)[0], model(ids)[0])


def test_a_sequence_longer_than_the_context_is_refused():
    model = random_model("gpt", context=8)
    with pytest.raises(AssertionError, match="longer than the model's context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@torch.no_grad()
def test_without_positions_and_segments_the_logits_are_bit_identical(block):
    model = random_model(block)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    assert torch.equal(model(ids, positions=None, segments=None)[0], model(ids)[0])
    # One segment per row and the default positions: the mask path computes what is_causal does.
    one_segment = dict(positions=torch.arange(12).expand(2, 12), segments=torch.zeros(2, 12, dtype=torch.long))
    torch.testing.assert_close(model(ids, **one_segment)[0], model(ids)[0], atol=1e-5, rtol=1e-5)


def test_rope_tables_per_row_stack_the_tables_of_each_row():
    from pipeline.model.gpt import rope_tables

    positions = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]])
    cos, sin = rope_tables(8, positions, 10000.0)
    assert cos.shape == sin.shape == (2, 1, 5, 8)
    for row in range(2):
        expected = rope_tables(8, positions[row], 10000.0)
        assert torch.equal(cos[row, 0], expected[0]) and torch.equal(sin[row, 0], expected[1])


def test_packed_rows_cannot_continue_a_kv_cache():
    model = random_model("llama")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 4))
    _, past = model(ids, use_cache=True)
    with pytest.raises(AssertionError, match="cannot be combined with a KV cache"):
        model(ids, past=past, segments=torch.zeros(1, 4, dtype=torch.long))
