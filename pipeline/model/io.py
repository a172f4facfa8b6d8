"""One loader and one publisher for every model the pipeline reads or writes.

``load_pretrained`` takes what a user names: a stage directory (model.pt, or an sft adapter with its base),
a Lightning checkpoint (.ckpt) or a model.pt file, or a transformers directory (config.json), and
returns our GPT with the tokenizer.json it was trained with. ``publish_model`` writes what a training
stage leaves behind: model.pt, tokenizer.json, the kept checkpoints, an optional chat template, and a
transformers export (hf/) that ``AutoModelForCausalLM`` loads offline.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from torch import nn

from pipeline.errors import BadInput
from pipeline.files import file_hash, link_or_copy
from pipeline.model.checkpoints import checkpoints
from pipeline.model.gpt import GPT, MODEL_FILE, load_model, save_model

TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"
ADAPTER = "adapter"


@dataclass
class Pretrained:
    model: nn.Module  # our GPT; with an adapter, peft's model around it (``merge`` folds it in)
    tokenizer_json: Path
    chat_template: Optional[str] = None  # the Jinja template an sft or merge output was trained with


def _near(path: Path) -> list[Path]:
    """Where a model's companions (tokenizer.json, chat template) sit: the directory itself, or beside a
    file or one folder up (a checkpoint in checkpoints/)."""
    return [path] if path.is_dir() else [path.parent, path.parent.parent]


def tokenizer_candidates(path: Path) -> list[Path]:
    """The tokenizer.json files that may belong to the model at ``path``, the likeliest first."""
    return [d / TOKENIZER for d in _near(Path(path))]


def model_kind(path: Path) -> Optional[str]:
    """What ``load_pretrained`` would read at ``path``: transformers, adapter, model, or None (nothing it reads)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return "transformers"
    if path.is_dir() and (path / ADAPTER).is_dir():
        return "adapter"
    if (path.is_dir() and (path / MODEL_FILE).is_file()) or (path.is_file() and path.suffix in (".ckpt", ".pt")):
        return "model"
    return None


def load_pretrained(path: Path, key: str = "path", tokenizer_json: Optional[Path] = None,
                    stage_dirs: Optional[Mapping[str, Path]] = None, keep_adapter: bool = False) -> Pretrained:
    """The model at ``path`` (see the module's docstring); ``key`` names the setting in error messages.

    ``tokenizer_json`` overrides the search for the tokenizer beside the model. An sft adapter is folded
    into its base (a plain GPT) unless ``keep_adapter``; its base is the upstream stage's directory in
    ``stage_dirs`` when given there, else the path the sft manifest recorded.
    """
    path = Path(path)
    kind = model_kind(path)
    if kind is None:
        raise BadInput(f"{key}={path}: expected a transformers directory (config.json), a stage directory "
                       f"({MODEL_FILE} or {ADAPTER}/), or a checkpoint (.ckpt, .pt)")
    if tokenizer_json is None:
        tokenizer_json = next((c for c in tokenizer_candidates(path) if c.is_file()), None)
    if tokenizer_json is None:
        hint = " (a transformers fast tokenizer is needed)" if kind == "transformers" else ""
        raise BadInput(f"{key}={path}: no {TOKENIZER} in {' or '.join(map(str, _near(path)))}{hint}")
    template = next((d / CHAT_TEMPLATE for d in _near(path) if (d / CHAT_TEMPLATE).is_file()), None)
    chat_template = template.read_text() if template else None
    if kind == "transformers":
        from pipeline.model.export import import_transformers

        model = import_transformers(path)
    elif kind == "adapter":
        from pipeline.sft.lora import load_adapter

        from pipeline.sft.lora import merge

        base = load_pretrained(adapter_base(path, stage_dirs or {}), f"{key} (the adapter's base)",
                               stage_dirs=stage_dirs).model
        model = load_adapter(base, path / ADAPTER)
        model = model if keep_adapter else merge(model)
    else:
        model = load_model(path)
    return Pretrained(model, Path(tokenizer_json), chat_template)


def adapter_base(stage_dir: Path, stage_dirs: Mapping[str, Path]) -> Path:
    """The directory of the model a stage's adapter (sft's, dpo's) was trained on: its stage's in ``stage_dirs``,
    else the path the manifest recorded. A base stage rebuilt since (its manifest is not the one the adapter's
    stage read) is refused: the adapter fits only the weights it was trained on."""
    manifest_path = Path(stage_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise BadInput(f"{stage_dir} holds an adapter but no manifest.json naming its base model")
    manifest = json.loads(manifest_path.read_text())
    base = manifest["outputs"]["base"]
    stage = base.get("stage")
    directory = Path(stage_dirs[stage]) if stage in stage_dirs else Path(base["path"])
    read = manifest.get("inputs", {}).get(stage, {}).get("manifest_sha256")
    if read and (directory / "manifest.json").is_file() and file_hash(directory / "manifest.json") != read:
        raise BadInput(f"{stage} was rebuilt after {manifest.get('stage', Path(stage_dir).name)} trained its adapter "
                       f"on it: run 'make {manifest.get('stage', Path(stage_dir).name)}' again")
    return directory


def keep_checkpoints(checkpoint_dir: Path, out_dir: Path) -> list[str]:
    """Link (or, across filesystems, copy) a run's step-*.ckpt files into ``out_dir`` (created); return their names.

    The originals stay until the stage's output is published, so a failure later in publishing (a full
    disk while writing hf/) loses no training: the next run resumes from them and only publishes.
    """
    out_dir.mkdir()
    for path in checkpoints(checkpoint_dir):
        link_or_copy(path, out_dir / path.name)
    return sorted(p.name for p in out_dir.iterdir())


def publish_model(model: GPT, tokenizer_json: Path, out_dir: Path, special: Optional[Mapping[str, str]] = None,
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
