"""The model's and decoding's settings as plain dataclasses, importable without torch (the config reads them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Optional

from pipeline.errors import BadInput, check, choice


class BlockKind(StrEnum):
    gpt = "gpt"  # GPT-2: learned positions, LayerNorm, GELU MLP
    llama = "llama"  # RoPE, RMSNorm, SwiGLU MLP, no biases


@dataclass
class ModelConfig:
    block: BlockKind = BlockKind.gpt
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: Optional[int] = 512  # feed-forward width; None: 4 * d_model (the standard GPT shape)
    context: int = 128  # longest sequence the model sees (learned positions exist up to here)
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    dropout: float = 0.0
    bias: bool = True  # linear and norm biases (gpt only; llama has none)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # llama only
    init_std: float = 0.02

    def __post_init__(self):
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        self.block = choice(BlockKind, self.block, "block")
        check(self.n_layer >= 1, "n_layer", self.n_layer, "at least 1")
        check(self.n_head >= 1 and self.d_model % self.n_head == 0, "n_head", self.n_head,
              f"at least 1 and divide d_model ({self.d_model})")
        check(self.context >= 2, "context", self.context, "at least 2")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        if self.block == "llama":
            self.bias = False

    def as_dict(self) -> dict:
        """Plain values (the block as a string), as checkpoints and model.pt store them."""
        return {**asdict(self), "block": self.block.value}

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class DecodeSpec:
    strategy: str = "greedy"  # greedy | sample | beam
    max_new_tokens: int = 64
    temperature: float = 1.0  # sample: logits are divided by it (higher: flatter)
    top_k: int = 0  # sample: keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # sample: keep the smallest set whose probability reaches top_p; 1.0 = off
    num_beams: int = 4  # beam
    length_penalty: float = 1.0  # beam: a hypothesis scores logprob / length ** length_penalty
    seed: int = 0  # sample: the same seed gives the same text

    def __post_init__(self):
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens}: must be >= 0")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature}: must be > 0 (strategy=greedy takes the argmax)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k}: must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p}: must be in (0, 1] (1 turns it off)")
        if self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams}: must be >= 1")
        if problems:
            raise BadInput("decoding: " + "; ".join(problems))
