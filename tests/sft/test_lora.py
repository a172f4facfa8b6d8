"""LoRA on our GPT (both blocks) and on a transformers GPT-2: exact at init, only adapters (and chosen
embedding rows) train, merge is exact."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pipeline.errors import BadInput, ConfigError
from pipeline.model.gpt import GPT, ModelConfig
from pipeline.sft.lora import (ATTENTION, MLP, LoraSpec, add_lora, default_targets, load_adapter, merge,
                               save_adapter, target_modules, trainable_fraction)
from pipeline.sft.train import trainable_groups

KINDS = ["gpt", "llama", "hf-gpt2"]  # hf-gpt2: transformers' GPT2LMHeadModel, whose layers are Conv1D
VOCAB, D, FF, LAYERS = 100, 32, 64, 2


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to reach the Hub fails instead of downloading."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "hf-gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_head=2, n_embd=D, vocab_size=VOCAB, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)).eval()
    return GPT(ModelConfig(block=kind, n_layer=LAYERS, n_head=2, d_model=D, d_ff=FF, context=32,
                           vocab_size=VOCAB)).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    out = model(x)
    return out[0] if isinstance(out, tuple) else out.logits  # ours returns (logits, cache)


def train_a_little(model: nn.Module, steps: int = 5) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x = ids(seed=100 + step)
        out = model(x)
        y = out[0] if isinstance(out, tuple) else out.logits
        loss = nn.functional.cross_entropy(y[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-adapter parameter, keyed by its name with peft's wrapping taken out."""
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_adapter_computes_the_base_model(kind):
    base = build(kind)
    expected = logits(base, ids())
    assert torch.equal(logits(add_lora(base, LoraSpec()), ids()), expected)  # B starts at zero


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_only_the_adapter_and_merge_is_exact(kind):
    base = build(kind)
    before_logits, before = logits(base, ids()), base_weights(base)
    model = add_lora(base, LoraSpec(targets=default_targets(base, mlp=True)))
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    train_a_little(model)
    adapted = logits(model, ids())
    assert not torch.allclose(adapted, before_logits, atol=1e-4), "training the adapter changed nothing"
    after = base_weights(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before), "a base weight moved"

    merged = merge(model)
    assert type(merged) is type(base)
    assert not [n for n, _ in merged.named_modules() if "lora" in n]
    assert merged.state_dict().keys() == build(kind).state_dict().keys()  # the original layout, loadable as is
    torch.testing.assert_close(logits(merged, ids()), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_adapter_loads_back_onto_a_fresh_base(kind, tmp_path):
    base = build(kind)
    fresh = copy.deepcopy(base)  # add_lora injects into the model it is given
    model = add_lora(base, LoraSpec())
    train_a_little(model, steps=2)
    save_adapter(model, tmp_path / "adapter")

    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))
    assert trainable_fraction(loaded)[0] == 0  # loaded for inference unless asked otherwise


TOKENS = [3, 97]  # rows of the (tied) embedding trained beside the adapters


def embedding(model: nn.Module) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach().clone()


@pytest.mark.parametrize("kind", KINDS)
def test_trained_token_rows_move_in_the_embedding_and_the_tied_output_layer(kind, tmp_path):
    base = build(kind)
    fresh = copy.deepcopy(base)
    before_logits, before_rows = logits(base, ids()), embedding(base)
    model = add_lora(base, LoraSpec(tokens=TOKENS))
    assert torch.equal(logits(model, ids()), before_logits)  # the deltas start at zero
    train_a_little(model)
    adapted = logits(model, ids())
    with model.disable_adapter():
        assert torch.equal(logits(model, ids()), before_logits)  # the base model, as generations compare

    save_adapter(model, tmp_path / "adapter")
    assert torch.equal(logits(load_adapter(fresh, tmp_path / "adapter"), ids()), adapted)

    merged = merge(model)
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight  # still tied
    rows = embedding(merged)
    others = [i for i in range(VOCAB) if i not in TOKENS]
    assert torch.equal(rows[others], before_rows[others])
    assert not torch.allclose(rows[TOKENS], before_rows[TOKENS], atol=1e-4), "the token rows did not train"
    # Equal logits with a tied merged model: the adapter's output layer used the trained rows too.
    torch.testing.assert_close(logits(merged, ids()), adapted, atol=1e-5, rtol=0)


def test_token_rows_count_as_trainable_and_must_exist():
    trainable, _, _ = trainable_fraction(add_lora(build("gpt"), LoraSpec(tokens=TOKENS)))
    assert trainable == LAYERS * 8 * ((D + 3 * D) + (D + D)) + len(TOKENS) * D
    with pytest.raises(BadInput, match=r"lora tokens \[100\] are outside this model's vocabulary of 100"):
        add_lora(build("gpt"), LoraSpec(tokens=[5, 100]))
    with pytest.raises(BadInput, match="each token id once"):
        add_lora(build("gpt"), LoraSpec(tokens=[5, 5]))


def test_adapter_matrices_decay_but_token_rows_and_biases_do_not():
    model = add_lora(build("gpt"), LoraSpec(tokens=TOKENS, bias="all"))
    decay, no_decay = trainable_groups(model, weight_decay=0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["params"] and all("lora_" in names[id(p)] for p in decay["params"])
    kept = [names[id(p)] for p in no_decay["params"]]
    assert any("trainable_tokens_delta" in n for n in kept) and any(n.endswith(".bias") for n in kept)
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kind, targets, per_layer", [
    ("gpt", ATTENTION, (D + 3 * D) + (D + D)),  # qkv: d -> 3d, proj: d -> d
    ("hf-gpt2", ATTENTION, (D + 3 * D) + (D + D)),  # the same layers, as Conv1D
    ("gpt", ATTENTION + ["mlp.up", "mlp.down"], (D + 3 * D) + (D + D) + 2 * (D + FF)),
    ("llama", ATTENTION + MLP, (D + 3 * D) + (D + D) + 3 * (D + FF)),
])
def test_trainable_count_is_rank_times_fan_in_plus_fan_out(kind, targets, per_layer):
    base = build(kind)
    n_base = sum(p.numel() for p in base.parameters())
    trainable, total, fraction = trainable_fraction(add_lora(base, LoraSpec(rank=8, targets=targets)))
    assert trainable == LAYERS * 8 * per_layer
    assert total == n_base + trainable
    assert fraction == trainable / total


def test_attention_adapters_are_a_small_fraction_of_a_real_model():
    base = GPT(ModelConfig(n_layer=4, n_head=4, d_model=128, d_ff=512, context=128, vocab_size=4096))  # mini
    trainable, _, fraction = trainable_fraction(add_lora(base, LoraSpec(rank=8)))
    assert trainable == 4 * 8 * (128 * 6)
    assert fraction < 0.02, fraction


def test_our_names_map_onto_transformers_layers():
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         hidden_size=D, intermediate_size=FF, vocab_size=VOCAB))
    assert sorted(target_modules(llama, LoraSpec(targets=["attn.qkv"]))) == sorted(
        f"model.layers.{i}.self_attn.{x}_proj" for i in range(2) for x in "qkv")
    assert target_modules(build("hf-gpt2"), LoraSpec(targets=["mlp.down"])) == [
        f"transformer.h.{i}.mlp.c_proj" for i in range(2)]  # not attn.c_proj, which shares the last name
    assert default_targets(build("gpt"), mlp=True) == ["attn.qkv", "attn.proj", "mlp.up", "mlp.down"]


def test_a_target_that_matches_nothing_is_named():
    with pytest.raises(BadInput, match=r"'attn\.q_proj' matches no Linear layer.*blocks\.\*\.attn\.qkv"):
        target_modules(build("gpt"), LoraSpec(targets=["attn.qkv", "attn.q_proj"]))
    with pytest.raises(BadInput, match="'mlp.gate' matches no Linear layer"):  # gpt blocks have no gate
        add_lora(build("gpt"), LoraSpec(targets=["mlp.gate"]))


def test_an_output_layer_tied_to_the_embedding_is_refused():
    with pytest.raises(BadInput, match="lm_head, whose weight is tied to the token embedding"):
        target_modules(build("gpt"), LoraSpec(targets=["lm_head"]))


@pytest.mark.parametrize("field, value", [("rank", 0), ("dropout", 1.0), ("bias", "some")])
def test_bad_specs_are_refused_naming_the_key(field, value):
    with pytest.raises(ConfigError, match=f"config key '{field}' is {value!r}; it must be"):
        LoraSpec(**{field: value})  # refused when built (and so when the config is loaded), before any model


def test_empty_targets_are_refused():
    with pytest.raises(BadInput, match="lora targets is empty"):
        add_lora(build("gpt"), LoraSpec(targets=[]))


def test_an_adapter_for_another_model_is_refused(tmp_path):
    save_adapter(add_lora(build("gpt"), LoraSpec()), tmp_path / "adapter")
    with pytest.raises(BadInput, match="does not fit"):
        load_adapter(build("hf-gpt2"), tmp_path / "adapter")
    with pytest.raises(BadInput, match="adapter_config.json is missing"):
        load_adapter(build("gpt"), tmp_path / "nothing")


def test_a_merged_transformers_model_saves_and_loads_with_auto_class(tmp_path):
    model = add_lora(build("hf-gpt2"), LoraSpec(targets=default_targets(build("hf-gpt2"), mlp=True)))
    train_a_little(model)
    adapted = logits(model, ids())
    merge(model).save_pretrained(tmp_path / "merged")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert type(reloaded) is GPT2LMHeadModel
    torch.testing.assert_close(logits(reloaded, ids()), adapted, atol=1e-5, rtol=0)


def test_chat_lora_is_a_plain_spec_with_the_markers_rows():
    from pipeline.config import SftLora
    from pipeline.sft.lora import chat_lora
    from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer

    tokenizer = byte_tokenizer(SpecialTokens().all())
    settings = SftLora(rank=4, alpha=8, targets=["attn.qkv"], enabled=True, chat_tokens=True)
    spec = chat_lora(settings, "chatml", tokenizer, settings.chat_tokens)
    assert type(spec) is LoraSpec and (spec.rank, spec.alpha, spec.targets) == (4, 8, ["attn.qkv"])
    assert spec.tokens == [tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")]
    assert spec.targets is not settings.targets  # the run's spec does not alias the config's list
    assert chat_lora(settings, "llama2", tokenizer, chat_tokens=False).tokens == []
    bare = byte_tokenizer(["<s>", "</s>", "<pad>"])
    with pytest.raises(BadInput, match=r"lacks the chat markers \['<\|im_start\|>', '<\|im_end\|>'\]"):
        chat_lora(settings, "chatml", bare)
