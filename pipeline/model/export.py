"""Export to and import from transformers, so a trained model loads with ``AutoModelForCausalLM``.

    gpt    -> GPT2LMHeadModel   (Conv1D layers: weights stored transposed relative to nn.Linear)
    llama  -> LlamaForCausalLM  (our fused qkv is split into q_proj, k_proj, v_proj)

Both directions are exact (same logits) or refuse: a transformers config this model cannot express
(GPT-2's tanh GELU, grouped-query attention, untied embeddings, RoPE scaling, ...) raises BadInput
rather than loading into something that computes a different function.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline.errors import BadInput
from pipeline.model.gpt import GPT, ModelConfig, unpickling_refused

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


@dataclass(frozen=True)
class _Param:
    ours: str
    theirs: str
    conv1d: bool = False  # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear's (out, in)


def _gpt2_params(cfg: ModelConfig) -> list[_Param]:
    params = [_Param("tok_emb.weight", "transformer.wte.weight"), _Param("pos_emb.weight", "transformer.wpe.weight")]
    for i in range(cfg.n_layer):
        o, t = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs, conv1d in [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                     ("attn.proj", "attn.c_proj", True), ("norm2", "ln_2", False),
                                     ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)]:
            params += [_Param(f"{o}{ours}.weight", f"{t}{theirs}.weight", conv1d),
                       _Param(f"{o}{ours}.bias", f"{t}{theirs}.bias")]
    params += [_Param("norm.weight", "transformer.ln_f.weight"), _Param("norm.bias", "transformer.ln_f.bias")]
    return params


def _llama_params(cfg: ModelConfig) -> list[_Param]:
    """Every parameter but the fused qkv, which is split apart (see _to_llama_qkv)."""
    params = [_Param("tok_emb.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layer):
        o, t = f"blocks.{i}.", f"model.layers.{i}."
        params += [_Param(f"{o}norm1.weight", f"{t}input_layernorm.weight"),
                   _Param(f"{o}attn.proj.weight", f"{t}self_attn.o_proj.weight"),
                   _Param(f"{o}norm2.weight", f"{t}post_attention_layernorm.weight"),
                   _Param(f"{o}mlp.gate.weight", f"{t}mlp.gate_proj.weight"),
                   _Param(f"{o}mlp.up.weight", f"{t}mlp.up_proj.weight"),
                   _Param(f"{o}mlp.down.weight", f"{t}mlp.down_proj.weight")]
    return params + [_Param("norm.weight", "model.norm.weight")]


def _qkv_names(i: int) -> tuple[str, list[str]]:
    return f"blocks.{i}.attn.qkv.weight", [f"model.layers.{i}.self_attn.{x}_proj.weight" for x in "qkv"]


def _hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int):
    from transformers import GPT2Config, LlamaConfig

    ids = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, vocab_size=cfg.vocab_size,
               initializer_range=cfg.init_std, tie_word_embeddings=True)
    if cfg.block == "gpt":
        return GPT2Config(n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
                          n_positions=cfg.context, activation_function="gelu",  # exact erf GELU, as F.gelu
                          layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                          attn_pdrop=cfg.dropout, summary_first_dropout=cfg.dropout, **ids)
    # Llama has no residual or embedding dropout; ours is only used in training anyway.
    return LlamaConfig(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
                       num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, head_dim=cfg.head_dim,
                       max_position_embeddings=cfg.context, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       attention_bias=False, mlp_bias=False, attention_dropout=cfg.dropout, **ids)


def _to_hf_state(model: GPT) -> dict[str, torch.Tensor]:
    cfg, ours = model.cfg, model.state_dict()
    theirs = {}
    for p in (_gpt2_params(cfg) if cfg.block == "gpt" else _llama_params(cfg)):
        if p.ours not in ours:  # a bias-free gpt: GPT-2 always has biases, and zeros compute the same
            assert p.ours.endswith(".bias") and not cfg.bias, f"{p.ours} is missing from the model's weights"
            weight = ours[p.ours.removesuffix(".bias") + ".weight"]
            theirs[p.theirs] = weight.new_zeros(weight.shape[0])
            continue
        theirs[p.theirs] = ours[p.ours].t() if p.conv1d else ours[p.ours]
    if cfg.block == "llama":
        for i in range(cfg.n_layer):
            fused, split = _qkv_names(i)
            theirs.update(zip(split, ours[fused].split(cfg.d_model, dim=0)))
    theirs["lm_head.weight"] = ours["tok_emb.weight"]  # tied: transformers saves it once
    return {k: v.contiguous() for k, v in theirs.items()}


def _token_id(tokenizer, token: str, tokenizer_json: Path) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise BadInput(f"{tokenizer_json} has no token {token!r}: pass the special tokens it was built with")
    return token_id


def export_transformers(model: GPT, tokenizer_json: Path, out_dir: Path, bos: str = "<s>", eos: str = "</s>",
                        pad: str = "<pad>", chat_template: Optional[str] = None) -> Path:
    """Write ``model`` and its tokenizer as a transformers directory (safetensors) and return it.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)`` then
    load offline. A ``chat_template`` (Jinja) is stored with the tokenizer, for ``apply_chat_template``. The directory is built beside ``out_dir`` and renamed into place, so a crash never
    leaves half an export; an existing ``out_dir`` is replaced.
    """
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer_json, out_dir = Path(tokenizer_json), Path(out_dir)
    if not tokenizer_json.is_file():
        raise BadInput(f"{tokenizer_json} does not exist: export needs the tokenizer the model was trained with")
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    if tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise BadInput(f"{tokenizer_json} has {tokenizer.get_vocab_size()} tokens, more than the model's "
                       f"vocab_size={model.cfg.vocab_size}: it is not the model's tokenizer")
    bos_id, eos_id, pad_id = (_token_id(tokenizer, t, tokenizer_json) for t in (bos, eos, pad))

    dtype = model.tok_emb.weight.dtype
    hf = AutoModelForCausalLM.from_config(_hf_config(model.cfg, bos_id, eos_id, pad_id), dtype=dtype)
    hf.load_state_dict(_to_hf_state(model), strict=True)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token=bos, eos_token=eos,
                                   pad_token=pad, model_max_length=model.cfg.context)
    if chat_template is not None:
        fast.chat_template = chat_template

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(tmp)
        fast.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_dir)
    return out_dir


def _check(ok: bool, path: Path, model_type: str, problem: str) -> None:
    if not ok:
        raise BadInput(f"{path}: this {model_type} model has {problem}, which pipeline.model.GPT cannot express")


def _our_config(hf_config, path: Path) -> ModelConfig:
    c, kind = hf_config, hf_config.model_type
    _check(c.tie_word_embeddings, path, kind, "untied input and output embeddings")
    if kind == "gpt2":
        _check(c.activation_function == "gelu", path, kind,
               f"activation_function={c.activation_function!r} (ours is the exact 'gelu')")
        _check(c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx, path, kind,
               "non-standard attention scaling")
        _check(not c.add_cross_attention, path, kind, "cross-attention")
        return ModelConfig(block="gpt", n_layer=c.n_layer, n_head=c.n_head, d_model=c.n_embd,
                           d_ff=c.n_inner or 4 * c.n_embd, context=c.n_positions, vocab_size=c.vocab_size,
                           dropout=c.resid_pdrop, bias=True, norm_eps=c.layer_norm_epsilon,
                           init_std=c.initializer_range)
    rope = c.rope_parameters or {}
    _check(c.num_key_value_heads == c.num_attention_heads, path, kind,
           f"num_key_value_heads={c.num_key_value_heads} != num_attention_heads={c.num_attention_heads} "
           f"(grouped-query attention)")
    _check(c.head_dim * c.num_attention_heads == c.hidden_size, path, kind,
           f"head_dim={c.head_dim} * num_attention_heads != hidden_size={c.hidden_size}")
    _check(c.hidden_act == "silu", path, kind, f"hidden_act={c.hidden_act!r} (ours is SwiGLU with silu)")
    _check(not c.attention_bias and not c.mlp_bias, path, kind, "linear biases")
    _check(rope.get("rope_type", "default") == "default", path, kind, f"rope_type={rope.get('rope_type')!r}")
    _check(rope.get("partial_rotary_factor", 1.0) == 1.0, path, kind, "partial rotary embeddings")
    return ModelConfig(block="llama", n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                       d_model=c.hidden_size, d_ff=c.intermediate_size, context=c.max_position_embeddings,
                       vocab_size=c.vocab_size, dropout=float(c.attention_dropout or 0.0), norm_eps=c.rms_norm_eps,
                       rope_theta=rope["rope_theta"], init_std=c.initializer_range)


def import_transformers(path: Path) -> GPT:
    """The inverse of export_transformers: a GPT from a GPT2LMHeadModel or LlamaForCausalLM directory.

    A GPT-2 whose biases are all exactly zero (the export of a bias-free model) comes back with bias=False.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BadInput(f"{config_file} is missing: expected a directory written by export_transformers "
                       f"or save_pretrained")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED:
        raise BadInput(f"{path}: model_type={model_type!r} is not supported; import reads "
                       f"{' or '.join(f'{t} ({cls})' for t, cls in SUPPORTED.items())}")
    cfg = _our_config(AutoConfig.from_pretrained(path, local_files_only=True), path)
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except pickle.UnpicklingError as e:  # a pytorch_model.bin that unpickles more than weights (not run)
        raise unpickling_refused(path, e) from None
    theirs = hf.state_dict()

    params = _gpt2_params(cfg) if cfg.block == "gpt" else _llama_params(cfg)
    if cfg.block == "gpt":
        cfg.bias = any(theirs[p.theirs].any() for p in params if p.theirs.endswith(".bias"))
    model = GPT(cfg)
    ours = {}
    for p in params:
        if p.ours.endswith(".bias") and not cfg.bias:
            continue
        ours[p.ours] = theirs[p.theirs].t() if p.conv1d else theirs[p.theirs]
    if cfg.block == "llama":
        for i in range(cfg.n_layer):
            fused, split = _qkv_names(i)
            ours[fused] = torch.cat([theirs[name] for name in split], dim=0)
    ours["lm_head.weight"] = ours["tok_emb.weight"]
    model.load_state_dict(ours, strict=True)
    return model
