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
