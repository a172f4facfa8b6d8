"""A decoder-only transformer in plain PyTorch, readable top to bottom.

Two block styles share one skeleton:
    gpt    pre-LayerNorm, GELU MLP, learned positions, biases (GPT-2's layout, so it exports as GPT2LMHeadModel)
    llama  pre-RMSNorm, SwiGLU MLP, rotary positions (RoPE), no biases (exports as LlamaForCausalLM)
Input and output embeddings are tied in both. ``forward`` takes and returns a KV cache for decoding,
or, for rows packing several short examples, each token's position in its own example and a segment
id per example, so that no token sees another example's tokens or offset (pipeline/sft/batching.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import BadInput
from pipeline.model.spec import ModelConfig


# One (key, value) pair per layer, each (batch, heads, time, head_dim).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.block == "llama":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin in the half-split layout that transformers' Llama uses.

    positions (time,) give tables (time, head_dim), shared by every row; positions (batch, time), one
    set per row, give (batch, 1, time, head_dim), which broadcasts over the heads of (batch, heads, time, head_dim).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    if positions.dim() == 2:
        angles = angles.unsqueeze(1)
    return angles.cos(), angles.sin()


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(batch, 1, time, time) boolean attention mask: query i sees key j when j <= i and both share a segment id."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                past: Optional[tuple[torch.Tensor, torch.Tensor]],
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, tuple]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.cfg.n_head, self.cfg.head_dim).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        S = k.shape[2]  # keys: past and present
        dropout = self.cfg.dropout if self.training else 0.0
        if mask is not None:  # packed examples: a block-diagonal causal mask (segment_mask), no past
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:  # query i sits at position S - T + i and sees keys up to there
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.llama = cfg.block == "llama"
        if self.llama:  # SwiGLU: down(silu(gate(x)) * up(x))
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.llama:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = _norm(cfg), Attention(cfg)
        self.norm2, self.mlp = _norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, past, mask=None):
        h, present = self.attn(self.norm1(x), rope, past, mask)
        x = x + self.drop(h)
        return x + self.drop(self.mlp(self.norm2(x))), present


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size, "ModelConfig.vocab_size must be set (from the tokenizer) before building the model"
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model) if cfg.block == "gpt" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.apply(self._init)
        # GPT-2: residual projections scaled down so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    # The transformers-style hooks peft reads (pipeline/sft/lora.py): with them, embedding rows trained
    # through ``trainable_token_indices`` change the tied output layer's rows as well, in training and merge.
    _tied_weights_keys = ["lm_head.weight"]

    @property
    def config(self) -> dict:
        return {"model_type": "custom", "tie_word_embeddings": True}

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, past: Optional[KVCache] = None, use_cache: bool = False,
                positions: Optional[torch.Tensor] = None,
                segments: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[KVCache]]:
        """Logits (batch, time, vocab) for token ids ``idx``, continuing after ``past`` when given.

        For packed rows (pipeline/sft/batching.py), ``positions`` (batch, time) is each token's position
        in its own example and ``segments`` (batch, time) its example's id: a token attends only to
        earlier tokens of its own segment. Either defaults to one sequence per row (0, 1, ... and causal
        attention over the whole row); neither goes with ``past``.
        """
        B, T = idx.shape
        start = past[0][0].shape[2] if past else 0
        assert start + T <= self.cfg.context, \
            f"sequence of {start + T} tokens is longer than the model's context of {self.cfg.context}"
        for name, t in (("positions", positions), ("segments", segments)):
            if t is not None:
                assert not past, f"{name} (packed rows) cannot be combined with a KV cache (past)"
                assert t.shape == idx.shape, f"{name} has shape {tuple(t.shape)}, expected {tuple(idx.shape)} like idx"
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)
        mask = segment_mask(segments) if segments is not None else None
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = rope_tables(self.cfg.head_dim, positions, self.cfg.rope_theta)
        x = self.drop(x)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, rope, past[i] if past else None, mask)
            presents.append(present)
        logits = self.lm_head(self.norm(x))
        return logits, (presents if use_cache else None)


def embedding_params(model: GPT) -> int:
    """Token (tied with the output layer) and position embedding parameters."""
    n = model.tok_emb.weight.numel()
    return n + (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)


def non_embedding_params(model: GPT) -> int:
    """N in the scaling-law sense: every parameter except the embeddings (Kaplan et al. 2020)."""
    return sum(p.numel() for p in model.parameters()) - embedding_params(model)


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention's 12 * layers * context * d (PaLM, app. B)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.context * cfg.d_model


MODEL_FILE = "model.pt"


def save_model(model: GPT, path) -> None:
    """Weights and shape in one file (written aside, then renamed)."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": model.cfg.as_dict(), "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)


def unpickling_refused(path, error: Exception) -> BadInput:
    """The one-line error for a file that ``torch.load(weights_only=True)`` refused (a pickle.UnpicklingError),
    naming the file and the type it wanted; for every loader that unpickles (transformers' .bin, peft's too)."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)|Unsupported operand (\d+)", str(error))
    wanted = (found.group(1) or f"pickle opcode {found.group(2)}") if found else "objects beyond plain values"
    return BadInput(f"{path}: the loader refuses to unpickle {wanted}: not a checkpoint this pipeline wrote; it "
                    f"reads tensors and plain values only (save a model you trust with pipeline.model.gpt.save_model)")


def read_checkpoint(path, map_location: str = "cpu") -> dict:
    """The dict in a model.pt or a Lightning .ckpt, unpickled with ``weights_only=True``.

    Only tensors and plain values come back, so a file crafted to run code when unpickled is refused, not
    run. Nothing is allow-listed: what this pipeline saves holds plain values only (save_model's config
    dict; LanguageModel's hyperparameters and LRSchedule's state, pipeline/train/module.py).
    """
    import pickle

    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise unpickling_refused(path, e) from None
    if not (isinstance(blob, dict) and "state_dict" in blob and ("config" in blob or "hyper_parameters" in blob)):
        raise BadInput(f"{path} is neither a {MODEL_FILE} (config, state_dict) nor a Lightning checkpoint "
                       f"(hyper_parameters, state_dict) of this pipeline")
    return blob


def load_model(path, map_location: str = "cpu") -> GPT:
    """A model from ``model.pt`` (save_model), a stage directory holding one, or a Lightning checkpoint (.ckpt)."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    blob = read_checkpoint(path, map_location)
    if "config" in blob:
        config, state = blob["config"], blob["state_dict"]
    else:  # Lightning: the module's hyperparameters hold the model config, its weights sit under "model."
        config = blob["hyper_parameters"]["model"]
        state = {k[len("model."):]: v for k, v in blob["state_dict"].items() if k.startswith("model.")}
    model = GPT(ModelConfig(**config))
    model.load_state_dict(state)
    return model
