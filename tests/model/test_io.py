"""The one loader and the one publisher: what publish_model writes, load_pretrained reads back as the same model."""
from __future__ import annotations

import copy
import json
import zipfile

import pytest
import torch
from tokenizers import Tokenizer

from pipeline.errors import BadInput
from pipeline.model.checkpoints import checkpoint_dir_for, checkpoint_path, checkpoints, latest_checkpoint
from pipeline.model.equivalence import check_export, fold_adapter, probe_ids, probe_logits
from pipeline.model.gpt import GPT
from pipeline.model.io import load_pretrained, model_kind, publish_model
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer
from tests.model.conftest import random_model

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture
def tokenizer_json(tmp_path):
    path = tmp_path / "given" / "tokenizer.json"
    path.parent.mkdir()
    byte_tokenizer(SpecialTokens().all()).save(str(path))
    return path


def same_logits(a, b) -> bool:
    ids = probe_ids(a.cfg, seed=3)
    return torch.allclose(probe_logits(a, ids), probe_logits(b, ids), atol=1e-5)


def test_published_model_loads_back_as_the_same_model_from_each_form(block, tokenizer_json, tmp_path):
    model = random_model(block)
    ckpt_dir = tmp_path / "run.ckpt"
    ckpt_dir.mkdir()
    for step in (10, 20):
        torch.save({"config": model.cfg.as_dict(), "state_dict": model.state_dict()}, checkpoint_path(ckpt_dir, step))
    out = tmp_path / "stage"
    out.mkdir()
    outputs = publish_model(model, tokenizer_json, out, SPECIAL, ckpt_dir, chat_template=TEMPLATE)
    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab()

    assert outputs == {"model": "model.pt", "tokenizer": "tokenizer.json", "model_config": model.cfg.as_dict(),
                       "checkpoints": ["step-000010.ckpt", "step-000020.ckpt"], "chat_template": "chat_template.jinja",
                       "hf": "hf"}
    kept = [(ckpt_dir / name, out / "checkpoints" / name) for name in outputs["checkpoints"]]
    assert all(a.samefile(b) for a, b in kept), "the kept checkpoints are linked into the output; the originals " \
        "stay until the stage's output is published"
    assert json.loads(json.dumps(outputs)) == outputs, "the manifest entries are plain values"
    for path, kind in [(out, "model"), (out / "checkpoints" / "step-000020.ckpt", "model"), (out / "hf", "transformers")]:
        assert model_kind(path) == kind
        loaded = load_pretrained(path)
        assert isinstance(loaded.model, GPT) and same_logits(loaded.model.eval(), model), path
        assert Tokenizer.from_file(str(loaded.tokenizer_json)).get_vocab() == vocab
    assert load_pretrained(out).chat_template == TEMPLATE
    assert load_pretrained(out / "checkpoints" / "step-000010.ckpt").tokenizer_json == out / "tokenizer.json", \
        "a checkpoint's tokenizer is found one folder up"


def test_publish_without_special_tokens_writes_no_export(tokenizer_json, tmp_path):
    outputs = publish_model(random_model("gpt"), tokenizer_json, tmp_path)
    assert sorted(outputs) == ["model", "model_config", "tokenizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given", "model.pt", "tokenizer.json"]


def test_loader_errors_name_the_setting_and_what_is_missing(tokenizer_json, tmp_path):
    with pytest.raises(BadInput, match=r"cpt\.init=.*nowhere: expected a transformers directory"):
        load_pretrained(tmp_path / "nowhere", "cpt.init")
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save({"config": random_model("gpt").cfg.as_dict(), "state_dict": random_model("gpt").state_dict()},
               bare / "model.pt")
    with pytest.raises(BadInput, match=r"sft\.init\.path=.*bare: no tokenizer\.json in"):
        load_pretrained(bare, "sft.init.path")
    assert load_pretrained(bare, tokenizer_json=tokenizer_json).tokenizer_json == tokenizer_json, \
        "a tokenizer named by the caller is used as it is"


def test_an_adapter_directory_loads_with_its_base_and_folds_into_one_model(tokenizer_json, tmp_path):
    from pipeline.sft.lora import LoraSpec, add_lora, save_adapter

    base = random_model("llama")
    base_dir = tmp_path / "pretrain"
    base_dir.mkdir()
    publish_model(base, tokenizer_json, base_dir)
    tuned = add_lora(copy.deepcopy(base), LoraSpec(rank=4, targets=["attn.qkv", "mlp.up"]))
    with torch.no_grad():  # LoRA starts as the identity (B = 0): give it something to fold in
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn_like(p))
    sft_dir = tmp_path / "sft"
    save_adapter(tuned, sft_dir / "adapter")
    (sft_dir / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (sft_dir / "chat_template.jinja").write_text(TEMPLATE)
    (sft_dir / "manifest.json").write_text(json.dumps({"outputs": {"base": {"stage": "pretrain",
                                                                            "path": str(base_dir)}}}))

    loaded = load_pretrained(sft_dir, "sft", keep_adapter=True)
    assert model_kind(sft_dir) == "adapter" and loaded.chat_template == TEMPLATE
    ids = probe_ids(base.cfg, seed=5)
    with_adapter = probe_logits(tuned.eval(), ids)
    assert torch.allclose(probe_logits(loaded.model.eval(), ids), with_adapter, atol=1e-5)
    folded = load_pretrained(sft_dir, "sft").model  # by default the adapter is folded in: a plain GPT
    assert isinstance(folded, GPT) and torch.allclose(probe_logits(folded.eval(), ids), with_adapter, atol=1e-4)
    # The base is the upstream stage's directory where one is given (outputs moved since sft ran) ...
    moved = tmp_path / "moved" / "pretrain"
    base_dir.rename(moved.parent.mkdir() or moved)
    relocated = load_pretrained(sft_dir, "sft", stage_dirs={"pretrain": moved}).model
    assert torch.allclose(probe_logits(relocated.eval(), ids), with_adapter, atol=1e-4)
    with pytest.raises(BadInput, match="the adapter's base"):  # ... else the path sft recorded
        load_pretrained(sft_dir, "sft")
    assert not torch.allclose(probe_logits(base, ids), with_adapter, atol=1e-3), "the adapter changes the model"
    merged, difference = fold_adapter(loaded.model, tolerance=1e-4)
    assert isinstance(merged, GPT) and difference <= 1e-4
    assert torch.allclose(probe_logits(merged, ids), with_adapter, atol=1e-4)
    plain = random_model("gpt")
    assert fold_adapter(plain, tolerance=0.0) == (plain, 0.0), "a fully fine-tuned model has nothing to fold"


def test_an_export_that_computes_another_function_is_refused(tokenizer_json, tmp_path):
    model = random_model("gpt")
    publish_model(model, tokenizer_json, tmp_path, SPECIAL)
    assert check_export(tmp_path / "hf", model, 1e-4) <= 1e-4
    other = random_model("gpt", seed=1)
    with pytest.raises(BadInput, match="the exported transformers model's logits differ"):
        check_export(tmp_path / "hf", other, 1e-4)


def test_checkpoints_sort_by_step_and_sit_beside_the_stage_as_the_contract_names_them(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (9, 10, 1_000_000):
        with zipfile.ZipFile(checkpoint_path(tmp_path, step), "w") as archive:  # torch.save's format
            archive.writestr("data.pkl", b"")
    (tmp_path / "step-000011.ckpt.tmp").touch()  # a checkpoint being written is not one yet
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000009.ckpt", "step-000010.ckpt", "step-1000000.ckpt"]
    assert latest_checkpoint(tmp_path).name == "step-1000000.ckpt"
    checkpoint_path(tmp_path, 1_000_000).write_bytes(b"PK\x03\x04 cut short")
    assert latest_checkpoint(tmp_path).name == "step-000010.ckpt", "the newest intact one"
    stage = tmp_path / "outputs" / "demo" / "pretrain"
    assert checkpoint_dir_for(stage) == stage.with_name("pretrain.ckpt")

