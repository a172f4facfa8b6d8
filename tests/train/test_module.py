"""The learning-rate schedules and which parameters get weight decay."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.gpt import GPT, ModelConfig
from pipeline.train.module import LanguageModel, LRSchedule, OptimSpec, param_groups


def test_warmup_then_cosine_to_the_floor():
    f = LRSchedule(OptimSpec(warmup_steps=10, min_lr_ratio=0.1, schedule="cosine"), max_steps=110)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half way: the cosine's midpoint between 1 and 0.1
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine decay never rises"


def test_wsd_holds_the_peak_then_decays_linearly():
    f = LRSchedule(OptimSpec(warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2), max_steps=100)
    assert all(f(s) == 1.0 for s in range(10, 80))
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=16, d_ff=32, context=8, vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == sorted(n for n in names.values()
                             if n.endswith("weight") and ("attn" in n or "mlp" in n))
    assert not any("emb" in n or "norm" in n or n.endswith("bias") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_the_lightning_state_dict_holds_the_weights_once():
    module = LanguageModel(dict(n_layer=1, n_head=2, d_model=16, d_ff=32, context=8, vocab_size=50),
                           {}, max_steps=10)
    keys = list(module.state_dict())
    assert keys and all(k.startswith("model.") for k in keys)
    batch = torch.randint(0, 50, (2, 9))
    logits = module(batch[:, :-1])
    assert logits.shape == (2, 8, 50)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), batch[:, 1:].reshape(-1))
    assert math.isclose(float(ce), math.log(50), rel_tol=0.05), "a fresh model is near uniform"
