"""transformers export: AutoModelForCausalLM computes our logits, AutoTokenizer our ids, import inverts it."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import BadInput
from pipeline.model.export import export_transformers, import_transformers
from pipeline.tokenizer.build import SpecialTokens, train_bpe
from tests.model.conftest import VOCAB, random_model

pytestmark = pytest.mark.usefixtures("hub_offline")  # nothing reaches the Hub

TEXT = "To be, or not to be: that is the question. <|im_start|>user\nWhether 'tis nobler</s> in the mind"


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    texts = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
             "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 20
    tokenizer = train_bpe(texts, vocab_size=VOCAB, min_frequency=2, special_tokens=SpecialTokens().all())
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def random_ids(model, n: int = 12) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_transformers_computes_our_logits(block, tokenizer_json, tmp_path):
    from transformers import AutoModelForCausalLM

    model = random_model(block, **({"rope_theta": 500.0} if block == "llama" else {}))
    out = export_transformers(model, tokenizer_json, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[block]
    assert (out / "model.safetensors").is_file()
    ids = random_ids(model, n=model.cfg.context)
    ours, _ = model(ids)
    torch.testing.assert_close(hf(ids).logits, ours, atol=1e-5, rtol=0)
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr(), "embeddings must stay tied"


@torch.no_grad()
def test_transformers_cached_generation_matches_ours(block, tokenizer_json, tmp_path):
    """transformers' own KV cache (generate) picks the same greedy tokens as our decoder."""
    from transformers import AutoModelForCausalLM

    from pipeline.model.generate import DecodeSpec, generate

    model = random_model(block)
    hf = AutoModelForCausalLM.from_pretrained(export_transformers(model, tokenizer_json, tmp_path / "hf")).eval()
    prompt = [5, 17, 42, 8]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert theirs[0, len(prompt):].tolist() == generate(model, prompt, DecodeSpec(max_new_tokens=8))


def test_auto_tokenizer_encodes_like_ours(tokenizer_json, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out = export_transformers(random_model("gpt"), tokenizer_json, tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = Tokenizer.from_file(str(tokenizer_json))
    assert theirs(TEXT)["input_ids"] == ours.encode(TEXT).ids
    assert theirs.decode(theirs(TEXT)["input_ids"]) == TEXT
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == ("<s>", "</s>", "<pad>")
    assert theirs.eos_token_id == ours.token_to_id("</s>")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        tuple(ours.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))


@torch.no_grad()
def test_import_round_trips(block, tokenizer_json, tmp_path):
    rope = {"rope_theta": 500.0} if block == "llama" else {}  # gpt has no RoPE, so nothing carries it
    model = random_model(block, dropout=0.1, norm_eps=1e-6, **rope)
    back = import_transformers(export_transformers(model, tokenizer_json, tmp_path / "hf")).eval()
    assert back.cfg == model.cfg
    ids = random_ids(model)
    torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=1e-6, rtol=0)


@torch.no_grad()
def test_bias_free_gpt_exports_zero_biases_and_comes_back_bias_free(tokenizer_json, tmp_path):
    from transformers import AutoModelForCausalLM

    model = random_model("gpt", bias=False)
    out = export_transformers(model, tokenizer_json, tmp_path / "hf")
    ids = random_ids(model)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-5, rtol=0)
    back = import_transformers(out)
    assert back.cfg.bias is False
    torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=1e-6, rtol=0)


def test_export_replaces_an_existing_directory(tokenizer_json, tmp_path):
    out = tmp_path / "hf"
    export_transformers(random_model("gpt", seed=1), tokenizer_json, out)
    (out / "stale.txt").write_text("from an earlier export")
    model = random_model("llama", seed=2)
    export_transformers(model, tokenizer_json, out)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"], "no temporary directories left behind"


def test_unsupported_directories_are_bad_input(tokenizer_json, tmp_path):
    with pytest.raises(BadInput, match="config.json is missing"):
        import_transformers(tmp_path / "nothing")

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(BadInput, match=r"bert.*model_type='bert' is not supported"):
        import_transformers(bert)

    from transformers import LlamaConfig

    for name, overrides, problem in [("gqa", dict(num_key_value_heads=2), "num_key_value_heads=2"),
                                     ("untied", dict(tie_word_embeddings=False), "untied"),
                                     ("scaled", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 1e4}), "rope_type='linear'")]:
        path = tmp_path / name
        LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                    vocab_size=VOCAB, **{"tie_word_embeddings": True, **overrides}).save_pretrained(path)
        with pytest.raises(BadInput, match=f"{name}.*{problem}"):
            import_transformers(path)

    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB).save_pretrained(tmp_path / "gelu_new")
    with pytest.raises(BadInput, match="activation_function='gelu_new'"):
        import_transformers(tmp_path / "gelu_new")


def test_export_refuses_a_tokenizer_without_the_special_tokens(tokenizer_json, tmp_path):
    with pytest.raises(BadInput, match="no token '<bos>'"):
        export_transformers(random_model("gpt"), tokenizer_json, tmp_path / "hf", bos="<bos>")
    assert not (tmp_path / "hf").exists()
