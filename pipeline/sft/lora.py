"""LoRA adapters (Hu et al. 2021) on our GPT or a transformers causal LM, through peft.

A frozen Linear ``h = W x`` gains a trainable low-rank path: ``h = W x + (alpha / rank) * B A x``,
A (rank, in) and B (out, rank), with B initialised to zero, so a fresh adapter computes exactly the base model. Only A and B train;
``merge`` folds them back into W, leaving a plain model of the original class.

Targets are module-name suffixes. Our names (``attn.qkv``, ``attn.proj``, ``mlp.up``, ``mlp.down``,
``mlp.gate``) also work on GPT2LMHeadModel and LlamaForCausalLM, mapped to their layers:

    ours        gpt2 (Conv1D)   llama
    attn.qkv    attn.c_attn     self_attn.q_proj, k_proj, v_proj
    attn.proj   attn.c_proj     self_attn.o_proj
    mlp.up      mlp.c_fc        mlp.up_proj
    mlp.down    mlp.c_proj      mlp.down_proj
    mlp.gate    -               mlp.gate_proj

Our GPT goes through ``peft.get_peft_model`` as it is, without a wrapper: with ``task_type`` left
unset peft builds a plain ``PeftModel`` whose forward passes its arguments straight to the model,
and save/load/merge only need the module tree. A task type (CAUSAL_LM) is set for transformers
models only, since its PeftModel subclass expects their ``input_ids``/``generate`` interface.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Union

from tokenizers import Tokenizer
from torch import nn

from pipeline.errors import BadInput
from pipeline.sft.chat import ChatTemplate, get_template
from pipeline.sft.spec import ATTENTION, MLP, LoraSpec

# Our generic names in each transformers family (model.config.model_type).
_GENERIC = {
    "gpt2": {"attn.qkv": ["attn.c_attn"], "attn.proj": ["attn.c_proj"], "mlp.up": ["mlp.c_fc"],
             "mlp.down": ["mlp.c_proj"]},
    "llama": {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "attn.proj": ["self_attn.o_proj"], "mlp.up": ["mlp.up_proj"], "mlp.down": ["mlp.down_proj"],
              "mlp.gate": ["mlp.gate_proj"]},
}


def chat_lora(spec: LoraSpec, template: Union[str, ChatTemplate], tokenizer: Tokenizer,
              chat_tokens: bool = True) -> LoraSpec:
    """``spec`` as a plain LoraSpec (a subclass's own switches left out); with ``chat_tokens`` the embedding
    rows of the template's markers train too (beside any ``spec.tokens``): pretraining never saw them as input."""
    markers = get_template(template).special_tokens if chat_tokens else ()
    tokens = [tokenizer.token_to_id(t) for t in markers]
    missing = [t for t, i in zip(markers, tokens) if i is None]
    if missing:
        raise BadInput(f"the tokenizer lacks the chat markers {missing} (sft.lora.chat_tokens)")
    values = {f.name: getattr(spec, f.name) for f in fields(LoraSpec)}
    tokens = list(dict.fromkeys([*spec.tokens, *tokens]))
    return LoraSpec(**{**values, "targets": list(spec.targets), "tokens": tokens})


def _family(model: nn.Module) -> str | None:
    """'gpt2' or 'llama' for a transformers model we can map our names onto; None for ours or any other."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in _GENERIC else None


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer LoRA can adapt here: nn.Linear, and transformers' Conv1D (GPT-2), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}


def default_targets(model: nn.Module, mlp: bool = False) -> list[str]:
    """The attention projections (and with ``mlp`` the MLP layers) as this model names them."""
    generic = ATTENTION + (MLP if mlp else [])
    family = _family(model)
    if family is not None:
        return [native for name in generic for native in _GENERIC[family].get(name, [])]
    names = linear_modules(model)
    return [name for name in generic if any(_matches(full, name) for full in names)]


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _short_list(names: list[str], limit: int = 12) -> str:
    """Module names with their layer index collapsed (blocks.3.attn.qkv -> blocks.*.attn.qkv), deduplicated."""
    shown = list(dict.fromkeys(".".join("*" if part.isdigit() else part for part in n.split(".")) for n in names))
    more = f", ... ({len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def target_modules(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the layers ``spec.targets`` picks in ``model``; a target that matches nothing is an error."""
    linears = linear_modules(model)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    family = _family(model)
    chosen: list[str] = []
    for target in spec.targets:
        suffixes = _GENERIC[family].get(target, [target]) if family else [target]
        found = [name for name in linears if any(_matches(name, s) for s in suffixes)]
        if not found:
            mapped = f" (looked for {', '.join(suffixes)})" if suffixes != [target] else ""
            raise BadInput(f"lora target {target!r} matches no Linear layer of this {type(model).__name__}{mapped}; "
                           f"its Linear layers are: {_short_list(list(linears))}")
        for name in found:
            if id(linears[name].weight) in tied:
                raise BadInput(f"lora target {target!r} picks {name}, whose weight is tied to the token embedding: "
                               f"merging an adapter into it would change the embedding too; drop it from the targets")
        chosen += [name for name in found if name not in chosen]
    return chosen


def _check(spec: LoraSpec) -> None:
    if not spec.targets:
        raise BadInput(f"lora targets is empty: name layers to adapt, e.g. {ATTENTION}")
    if len(set(spec.tokens)) != len(spec.tokens):
        raise BadInput(f"lora tokens {spec.tokens}: each token id once")


def _check_tokens(model: nn.Module, tokens: list[int]) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    outside = [t for t in tokens if not 0 <= t < vocab]
    if outside:
        raise BadInput(f"lora tokens {outside} are outside this model's vocabulary of {vocab} tokens")


def add_lora(model: nn.Module, spec: LoraSpec):
    """``model`` with LoRA adapters on ``spec.targets``; everything else frozen, but for the embedding
    rows of ``spec.tokens`` (peft's trainable tokens: a trained copy of each row replaces it, in the tied
    output layer too).

    peft injects the adapters into ``model`` in place and returns it wrapped in a PeftModel, which
    is called like ``model`` and offers ``save_pretrained`` and ``merge_and_unload``.
    """
    from peft import LoraConfig, get_peft_model

    _check(spec)
    if spec.tokens:
        _check_tokens(model, spec.tokens)
    names = target_modules(model, spec)
    modules = dict(model.named_modules())
    conv1d = {_is_conv1d(modules[n]) for n in names}
    if len(conv1d) > 1:  # peft keeps one fan_in_fan_out flag per adapter
        raise BadInput(f"lora targets {spec.targets} mix nn.Linear and Conv1D layers: adapt one kind at a time")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias=spec.bias,
                        target_modules=names,  # full names, so peft adapts exactly what we resolved
                        fan_in_fan_out=conv1d == {True},  # Conv1D stores (in, out), the transpose of nn.Linear
                        trainable_token_indices=list(spec.tokens) or None,  # on get_input_embeddings()
                        task_type="CAUSAL_LM" if _is_transformers(model) else None)
    peft_model = get_peft_model(model, config)
    frozen = [n for n, p in peft_model.named_parameters()
              if p.requires_grad and "lora_" not in n and "trainable_tokens_delta" not in n
              and (spec.bias == "none" or not n.endswith(".bias"))]
    assert not frozen, f"parameters outside the adapters are trainable: {frozen[:5]}"
    return peft_model


def _is_transformers(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def trainable_fraction(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, trainable / total) parameters; tied weights count once, adapters count in the total."""
    params = list(model.parameters())  # parameters() yields a tied weight once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return trainable, total, trainable / total


def save_adapter(peft_model, directory: Path) -> Path:
    """The adapter alone (adapter_config.json, adapter_model.safetensors): megabytes, not the whole model."""
    directory = Path(directory)
    peft_model.save_pretrained(directory)
    return directory


def load_adapter(base_model: nn.Module, directory: Path, trainable: bool = False):
    """``base_model`` with the adapter saved in ``directory``; frozen unless ``trainable`` (to train on)."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise BadInput(f"{directory / 'adapter_config.json'} is missing: expected a directory written by save_adapter")
    try:
        return PeftModel.from_pretrained(base_model, directory, is_trainable=trainable)
    except (ValueError, RuntimeError) as e:  # targets missing from the model, or shapes that differ
        raise BadInput(f"{directory}: the adapter does not fit this {type(base_model).__name__}: "
                       f"{' '.join(str(e).split())[:300]}") from e


def merge(peft_model) -> nn.Module:
    """The base model with each adapter folded into its weight (W + alpha/rank * BA): a plain model, no peft left."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN weights instead of writing them
    left = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert not left, f"merge left LoRA layers in the model: {left[:5]}"
    return model
