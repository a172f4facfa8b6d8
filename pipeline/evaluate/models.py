"""Models to evaluate, behind one interface: a pipeline stage's model.pt or a transformers directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer

from pipeline.errors import BadInput
from pipeline.evaluate.perplexity import LogitsFn


@dataclass
class ScoredModel:
    """What scoring needs: logits, the tokenizer, the token every document follows, the context length."""

    name: str
    logits_fn: LogitsFn
    tokenizer: Tokenizer
    prefix_id: int
    context: int
    parameters: int

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def _token(tokenizer: Tokenizer, token: str, where: Path) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise BadInput(f"{where}: the tokenizer has no token {token!r} (evaluate.prefix_token)")
    return token_id


def pipeline_model(name: str, path: Path, prefix_token: str, device: str) -> ScoredModel:
    """A training stage's output (model.pt + tokenizer.json) or one of its Lightning checkpoints (.ckpt, with
    tokenizer.json beside it or one folder up); documents follow ``prefix_token`` as in training."""
    from pipeline.model.gpt import load_model

    path = Path(path)
    near = [path] if path.is_dir() else [path.parent, path.parent.parent]
    tokenizer_json = next((d / "tokenizer.json" for d in near if (d / "tokenizer.json").is_file()), None)
    if tokenizer_json is None:
        raise BadInput(f"{path}: no tokenizer.json in {' or '.join(str(d) for d in near)}")
    model = load_model(path).to(device).eval()
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.encode_special_tokens = True  # as in training: "</s>" inside a document is text
    return ScoredModel(name, lambda ids: model(ids)[0], tokenizer, _token(tokenizer, prefix_token, path),
                       model.cfg.context, sum(p.numel() for p in model.parameters()))


def transformers_model(name: str, directory: Path, prefix_token: Optional[str], device: str,
                       context: Optional[int] = None) -> ScoredModel:
    """A causal LM directory that ``AutoModelForCausalLM`` loads offline, with a fast tokenizer (tokenizer.json).

    Documents follow ``prefix_token``, or the model's EOS token when that is None.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise BadInput(f"{directory} is not a transformers model directory (no config.json)")
    if not (directory / "tokenizer.json").is_file():
        raise BadInput(f"{directory} has no tokenizer.json (a fast tokenizer is needed to score text)")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise BadInput(f"{directory}: transformers cannot load it as a causal LM: {str(e).splitlines()[0]}") from e
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    if prefix_token is not None:
        prefix_id = _token(tokenizer, prefix_token, directory)
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
                       sum(p.numel() for p in model.parameters()))


def load_any(name: str, path: Path, prefix_token: Optional[str], eos_token: str, device: str,
             context: Optional[int] = None) -> ScoredModel:
    """A path as the user gives it: a transformers directory (config.json), a stage directory (model.pt)
    or a Lightning checkpoint (.ckpt)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return transformers_model(name, path, prefix_token, device, context)
    if (path / "model.pt").is_file() or (path.is_file() and path.suffix == ".ckpt"):
        return pipeline_model(name, path, prefix_token or eos_token, device)
    raise BadInput(f"evaluate.models.{name}.path={path}: not a transformers directory (config.json), a stage "
                   f"directory (model.pt) or a checkpoint (.ckpt)")


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
