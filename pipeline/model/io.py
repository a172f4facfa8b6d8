"""One loader and one publisher for every model the pipeline reads or writes.

``load_pretrained`` takes what a user names: a stage directory (model.pt, or an sft adapter with its base),
a Lightning checkpoint (.ckpt) or a model.pt file, or a transformers directory (config.json), and
returns our GPT with the tokenizer.json it was trained with. ``publish_model`` writes what a training
stage leaves behind: model.pt, tokenizer.json, the kept checkpoints, an optional chat template, and a
transformers export (hf/) that ``AutoModelForCausalLM`` loads offline.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from pipeline.errors import BadInput
from pipeline.model.gpt import GPT, MODEL_FILE, load_model, save_model

TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"
ADAPTER = "adapter"


@dataclass
class Pretrained:
    model: nn.Module  # our GPT; with an adapter, peft's model around it (``merge`` folds it in)
    tokenizer_json: Path
    chat_template: Optional[str] = None  # the Jinja template an sft or merge output was trained with


def _tokenizer_near(path: Path, key: str) -> Path:
    """tokenizer.json in a directory, or beside a file or one folder up (a checkpoint in checkpoints/)."""
    near = [path] if path.is_dir() else [path.parent, path.parent.parent]
    found = next((d / TOKENIZER for d in near if (d / TOKENIZER).is_file()), None)
    if found is None:
        raise BadInput(f"{key}={path}: no {TOKENIZER} in {' or '.join(map(str, near))}")
    return found


def load_pretrained(path: Path, key: str = "path") -> Pretrained:
    """The model at ``path`` (see the module's docstring); ``key`` names the setting in error messages."""
    path = Path(path)
    template = path / CHAT_TEMPLATE if path.is_dir() else path.parent / CHAT_TEMPLATE
    chat_template = template.read_text() if template.is_file() else None
    if path.is_dir() and (path / "config.json").is_file():
        from pipeline.model.export import import_transformers

        if not (path / TOKENIZER).is_file():
            raise BadInput(f"{key}={path} has no {TOKENIZER} (a transformers fast tokenizer is needed)")
        return Pretrained(import_transformers(path), path / TOKENIZER, chat_template)
    if path.is_dir() and (path / ADAPTER).is_dir():
        from pipeline.sft.lora import load_adapter

        base = adapter_base(path)
        model = load_adapter(load_pretrained(base, f"{key} (the adapter's base)").model, path / ADAPTER)
        return Pretrained(model, _tokenizer_near(path, key), chat_template)
    if (path.is_dir() and (path / MODEL_FILE).is_file()) or (path.is_file() and path.suffix in (".ckpt", ".pt")):
        return Pretrained(load_model(path), _tokenizer_near(path, key), chat_template)
    raise BadInput(f"{key}={path}: expected a transformers directory (config.json), a stage directory ({MODEL_FILE} "
                   f"or {ADAPTER}/), or a checkpoint (.ckpt, .pt)")


def adapter_base(stage_dir: Path) -> Path:
    """The directory of the model an sft stage's adapter was trained on, as its manifest records it."""
    manifest = Path(stage_dir) / "manifest.json"
    if not manifest.is_file():
        raise BadInput(f"{stage_dir} holds an adapter but no manifest.json naming its base model")
    return Path(json.loads(manifest.read_text())["outputs"]["base"]["path"])


def keep_checkpoints(checkpoint_dir: Path, out_dir: Path) -> list[str]:
    """Move a run's step-*.ckpt files into ``out_dir`` (created) and return their names."""
    out_dir.mkdir()
    for path in sorted(Path(checkpoint_dir).glob("step-*.ckpt")):
        os.replace(path, out_dir / path.name)
    return sorted(p.name for p in out_dir.iterdir())


def publish_model(model: GPT, tokenizer_json: Path, out_dir: Path, special: Optional[dict[str, str]] = None,
                  checkpoint_dir: Optional[Path] = None, chat_template: Optional[str] = None) -> dict:
    """model.pt, tokenizer.json, the checkpoints, the chat template and (``special`` given: bos, eos, pad) hf/.

    Returns the manifest's ``outputs`` entries for what it wrote.
    """
    out_dir = Path(out_dir)
    save_model(model, out_dir / MODEL_FILE)
    shutil.copy2(tokenizer_json, out_dir / TOKENIZER)
    outputs = {"model": MODEL_FILE, "tokenizer": TOKENIZER, "model_config": model.cfg.as_dict()}
    if checkpoint_dir is not None:
        outputs["checkpoints"] = keep_checkpoints(checkpoint_dir, out_dir / "checkpoints")
    if chat_template is not None:
        (out_dir / CHAT_TEMPLATE).write_text(chat_template)
        outputs["chat_template"] = CHAT_TEMPLATE
    if special is not None:
        from pipeline.model.export import export_transformers

        export_transformers(model, out_dir / TOKENIZER, out_dir / "hf", bos=special["bos"], eos=special["eos"],
                            pad=special["pad"], chat_template=chat_template)
        outputs["hf"] = "hf"
    return outputs
