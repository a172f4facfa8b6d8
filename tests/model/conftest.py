"""Tiny models with weights far from their init, so a wrong index or transpose changes the logits."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.gpt import GPT, ModelConfig

VOCAB = 300  # at least the byte tokenizer's 256 bytes + 9 special tokens


def random_model(block: str, seed: int = 0, scale: float = 0.3, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(block=block, n_layer=2, n_head=4, d_model=32, d_ff=48, context=16,
                                vocab_size=VOCAB), **overrides})
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # norm gains around 1, each one different
                p.copy_(1 + scale * torch.randn_like(p))
            else:  # biases too: GPT init leaves them all zero, which would hide a misplaced bias
                p.copy_(scale * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=["gpt", "llama"])
def block(request) -> str:
    return request.param
