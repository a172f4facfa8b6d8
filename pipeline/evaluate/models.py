"""Models to evaluate, behind one interface: ours (through ``pipeline.model.io.load_pretrained``) or any
transformers causal LM directory."""
from __future__ import annotations

import pickle

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer

from pipeline.errors import BadInput
from pipeline.evaluate.perplexity import LogitsFn
from pipeline.model.gpt import unpickling_refused
from pipeline.model.io import TOKENIZER, load_pretrained, model_kind
from pipeline.tokenizer.build import token_id


@dataclass
class ScoredModel:
    """What scoring needs: logits, the tokenizer, the token every document follows, the context length."""

    name: str
    logits_fn: LogitsFn
    tokenizer: Tokenizer
    prefix_id: int
    context: int
    parameters: int
    network: Optional[torch.nn.Module] = None  # the loaded model itself (our GPT, or a transformers causal LM), in eval mode
    kind: str = "pipeline"  # pipeline (pipeline.model.gpt.GPT) | transformers

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def pipeline_model(name: str, path: Path, prefix_token: str, device: str, key: str = "path") -> ScoredModel:
    """One of our models as ``load_pretrained`` reads it (a stage directory with model.pt or an sft adapter, a
    Lightning checkpoint or a .pt file, with its tokenizer.json); documents follow ``prefix_token`` as in training.
    ``key`` names the setting in error messages."""
    loaded = load_pretrained(path, key)
    model = loaded.model.to(device).eval()
    tokenizer = Tokenizer.from_file(str(loaded.tokenizer_json))
    tokenizer.encode_special_tokens = True  # as in training: "</s>" inside a document is text
    prefix_id = token_id(tokenizer, prefix_token, path, "evaluate.prefix_token")
    return ScoredModel(name, lambda ids: model(ids)[0], tokenizer, prefix_id, model.cfg.context,
                       sum(p.numel() for p in model.parameters()), model)


def transformers_model(name: str, directory: Path, prefix_token: Optional[str], device: str,
                       context: Optional[int] = None) -> ScoredModel:
    """A causal LM directory that ``AutoModelForCausalLM`` loads offline, with a fast tokenizer (tokenizer.json).

    Documents follow ``prefix_token``, or the model's EOS token when that is None.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise BadInput(f"{directory} is not a transformers model directory (no config.json)")
    if not (directory / TOKENIZER).is_file():
        raise BadInput(f"{directory} has no {TOKENIZER} (a fast tokenizer is needed to score text)")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                     trust_remote_code=False).to(device).eval()
    except pickle.UnpicklingError as e:  # a pytorch_model.bin that unpickles more than weights (not run)
        raise unpickling_refused(directory, e) from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{directory}: transformers cannot load it as a causal LM: {str(e).splitlines()[0]}") from e
    tokenizer = Tokenizer.from_file(str(directory / TOKENIZER))
    if prefix_token is not None:
        prefix_id = token_id(tokenizer, prefix_token, directory, "evaluate.prefix_token")
    else:
        prefix_id = model.config.eos_token_id
        prefix_id = prefix_id[0] if isinstance(prefix_id, list) else prefix_id
        if prefix_id is None:
            raise BadInput(f"{directory}: config.json has no eos_token_id; set evaluate.prefix_token")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    context = context or limit
    if context is None:
        raise BadInput(f"{directory}: config.json states no context length; set evaluate.context")
    return ScoredModel(name, lambda ids: model(input_ids=ids).logits, tokenizer, prefix_id, int(context),
                       sum(p.numel() for p in model.parameters()), model, "transformers")


def load_any(name: str, path: Path, prefix_token: Optional[str], eos_token: str, device: str,
             context: Optional[int] = None, key: Optional[str] = None) -> ScoredModel:
    """A path as the user gives it: a transformers directory (config.json) of any architecture, scored by
    transformers itself, or anything ``load_pretrained`` reads (stage directory, .ckpt, .pt), whose documents
    follow ``prefix_token`` or else ``eos_token``."""
    if model_kind(path) == "transformers":
        return transformers_model(name, path, prefix_token, device, context)
    return pipeline_model(name, path, prefix_token or eos_token, device, key or f"evaluate.models.{name}.path")


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)
