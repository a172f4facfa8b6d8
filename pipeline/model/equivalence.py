"""Checks that two forms of one model compute the same function: the largest logit difference on fixed
random tokens, between an adapter model and its merge, or between our model and its transformers export."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import BadInput
from pipeline.model.gpt import GPT, ModelConfig


def probe_ids(cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Two rows of ``context`` random token ids, the same for the same seed."""
    return torch.randint(0, cfg.vocab_size, (2, cfg.context), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def probe_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)[0].float()


def fold_adapter(model: nn.Module, tolerance: float) -> tuple[GPT, float]:
    """``model`` with its LoRA adapter folded into the weights, and the largest logit change that caused.

    A plain GPT (full fine-tuning) comes back as it is. A change above ``tolerance`` means the merge is wrong:
    BadInput, before anything is written.
    """
    if isinstance(model, GPT):
        return model.eval(), 0.0
    from pipeline.sft.lora import merge

    ids = probe_ids(model.cfg, seed=0)
    with_adapter = probe_logits(model.eval(), ids)  # before merging: the merge changes the base's weights in place
    merged = merge(model).eval()
    difference = float((probe_logits(merged, ids) - with_adapter).abs().max())
    if not difference <= tolerance:
        raise BadInput(f"the merged model's logits differ from the adapter model's by {difference:.2e} "
                       f"(more than {tolerance}): the merge is wrong, nothing was written")
    return merged, difference


def transformers_difference(directory: Path, model: GPT) -> float:
    """Largest logit difference between the directory loaded offline by transformers and ``model``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    ids = probe_ids(model.cfg, seed=1)
    with torch.no_grad():
        return float((hf(ids).logits.float() - probe_logits(model, ids)).abs().max())


def check_export(directory: Path, model: GPT, tolerance: float) -> float:
    """transformers_difference, refused (BadInput) above ``tolerance``."""
    difference = transformers_difference(directory, model)
    if not difference <= tolerance:
        raise BadInput(f"the exported transformers model's logits differ from the merged model's by {difference:.2e}")
    return difference
