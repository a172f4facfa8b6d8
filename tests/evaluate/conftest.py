"""A tiny GPT with a real BPE tokenizer, exported to a transformers directory, for evaluate tests that need both
sides of an export (our model and what transformers or lm-evaluation-harness load from it)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from pipeline.evaluate.models import ScoredModel
from pipeline.model.export import export_transformers
from pipeline.model.gpt import GPT
from pipeline.tokenizer.build import SpecialTokens, train_bpe, vocab_bound
from tests.model.conftest import random_model

TINY_CONTEXT = 64  # short enough that some PIQA prompts are cut and some solutions do not fit at all


@dataclass
class TinyExport:
    model: GPT  # ours, in eval mode
    tokenizer_json: Path  # byte-level BPE trained on the evaluation data, with <s>, </s>, <pad> and the chat markers
    hf_dir: Path  # export_transformers(model, tokenizer_json, ...)

    def scored(self, prefix_token: str = "</s>", name: str = "tiny") -> ScoredModel:
        """Our model behind ScoredModel, documents after ``prefix_token`` (as evaluate's pipeline_model loads it)."""
        tokenizer = Tokenizer.from_file(str(self.tokenizer_json))
        tokenizer.encode_special_tokens = True
        return ScoredModel(name, lambda ids: self.model(ids)[0], tokenizer, tokenizer.token_to_id(prefix_token),
                           self.model.cfg.context, sum(p.numel() for p in self.model.parameters()), self.model)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, data_dir) -> TinyExport:
    """A 2-layer GPT (weights far from their init, so it has opinions) and its BPE, exported once per session."""
    eval_dir = data_dir / "eval"
    texts = [line.split("\t")[0] for line in (eval_dir / "sst2" / "train.tsv").read_text().splitlines()[:3000]]
    for line in (eval_dir / "piqa" / "valid.jsonl").read_text().splitlines()[:600]:
        record = json.loads(line)
        texts += [record["goal"], record["sol1"], record["sol2"]]
    tokenizer = train_bpe(texts, vocab_size=700, min_frequency=2, special_tokens=SpecialTokens().all())
    root = tmp_path_factory.mktemp("tiny_export")
    tokenizer_json = root / "tokenizer.json"
    tokenizer.save(str(tokenizer_json))
    model = random_model("gpt", seed=0, scale=0.3, n_layer=2, n_head=4, d_model=32, d_ff=64,
                         context=TINY_CONTEXT, vocab_size=vocab_bound(tokenizer))
    return TinyExport(model, tokenizer_json, export_transformers(model, tokenizer_json, root / "hf"))
