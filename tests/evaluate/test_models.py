"""Models to evaluate: ours through the one model loader, any other transformers architecture natively."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import BadInput
from pipeline.evaluate.models import load_any
from pipeline.model.gpt import GPT, ModelConfig, save_model
from pipeline.tokenizer.build import byte_tokenizer

EOS = 256  # byte_tokenizer(["</s>"]): ids 0..255 are the bytes, "</s>" is 256


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, d_ff=64, context=48, vocab_size=260)).eval()


def test_a_stage_directory_and_a_checkpoint_beside_it_load_with_the_tokenizer_and_eos_prefix(tmp_path, gpt):
    byte_tokenizer(["</s>"]).save(str(tmp_path / "tokenizer.json"))
    save_model(gpt, tmp_path / "model.pt")
    (tmp_path / "checkpoints").mkdir()
    save_model(gpt, tmp_path / "checkpoints" / "last.pt")  # tokenizer.json is one folder up
    ids = torch.tensor([[EOS, 72, 105, 60, 47, 115, 62]])
    for path in (tmp_path, tmp_path / "checkpoints" / "last.pt"):
        model = load_any("ours", path, None, "</s>", "cpu")
        assert (model.prefix_id, model.context) == (EOS, 48)
        assert model.parameters == sum(p.numel() for p in gpt.parameters())
        assert model.encode(["</s>"]) == [[60, 47, 115, 62]], "as in training, a special token inside a text is text"
        with torch.no_grad():
            assert torch.equal(model.logits_fn(ids), gpt(ids)[0])
    assert load_any("ours", tmp_path, "<", "</s>", "cpu").prefix_id == 60, "evaluate.prefix_token wins over eos"


def test_another_transformers_architecture_is_scored_by_transformers_itself(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, eos_token_id=EOS, bos_token_id=EOS)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path)
    byte_tokenizer(["</s>"]).save(str(tmp_path / "tokenizer.json"))
    model = load_any("neox", tmp_path, None, "unused", "cpu")
    assert (model.prefix_id, model.context) == (EOS, 40), "the model's own EOS and context"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    ids = torch.tensor([[EOS, 72, 105, 33]])
    with torch.no_grad():
        assert torch.allclose(model.logits_fn(ids), reference(input_ids=ids).logits)
    assert load_any("neox", tmp_path, None, "unused", "cpu", context=16).context == 16


def test_a_path_that_holds_no_model_names_the_setting(tmp_path):
    with pytest.raises(BadInput, match=r"evaluate\.models\.x\.path=.*expected a transformers directory"):
        load_any("x", tmp_path, None, "</s>", "cpu")
    save_model(GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, context=8, vocab_size=260)),
               tmp_path / "model.pt")
    with pytest.raises(BadInput, match=r"evaluate\.models\.x\.path=.*no tokenizer\.json"):
        load_any("x", tmp_path, None, "</s>", "cpu")
    byte_tokenizer(["</s>"]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(BadInput, match=r"has no '<pad>' token \(evaluate\.prefix_token\)"):
        load_any("x", tmp_path, "<pad>", "</s>", "cpu")
