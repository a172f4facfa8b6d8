"""A training run's settings as plain dataclasses, importable without torch or Lightning (the config reads them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Optional

from pipeline.errors import ConfigError, check, choice


class Schedule(StrEnum):
    cosine = "cosine"
    wsd = "wsd"  # warmup, stable, then a linear decay over the last decay_fraction of the steps
    constant = "constant"  # after warmup


@dataclass
class OptimSpec:
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: Schedule = Schedule.cosine
    decay_fraction: float = 0.2  # wsd: the last share of steps that decays linearly
    weight_decay: float = 0.1  # on weight matrices only: never on norms, biases or embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8

    def __post_init__(self):
        self.schedule = choice(Schedule, self.schedule, "schedule")
        check(self.lr > 0, "lr", self.lr, "positive")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "at least 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")

    def as_dict(self) -> dict:
        """Plain values (the schedule as a string), as checkpoints store them."""
        return {**asdict(self), "schedule": self.schedule.value}


@dataclass
class TrainerSpec:
    """Where and how Lightning runs (conf/trainer/): the presets differ only here."""

    accelerator: str = "auto"  # cpu | gpu | auto
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | ...
    precision: str = "auto"  # auto: bf16-mixed on GPUs that support it, else 32-true
    cpu_peak_flops_per_core: float = 1e11  # for MFU on CPU: 3 GHz * 32 fp32 FLOP/cycle (two AVX2 FMA units)
    peak_flops: Optional[float] = None  # override the table (FLOP/s per device)
    matmul_precision: str = "high"  # torch.set_float32_matmul_precision (TF32 on Ampere and newer)

    def __post_init__(self):
        if self.strategy.startswith("fsdp") and self.accelerator == "cpu":  # Lightning 2.6 runs FSDP on CUDA only
            raise ConfigError("strategy", f"is {self.strategy} with accelerator=cpu: FSDP needs CUDA GPUs; on CPUs use "
                                          f"trainer=ddp")


@dataclass
class TrainSpec:
    """The optimisation of one run; pretrain and cpt each have one (conf/pretrain.yaml, conf/cpt.yaml)."""

    max_steps: int = 1000
    micro_batch_size: int = 16  # sequences per forward pass on one device
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    optim: OptimSpec = field(default_factory=OptimSpec)
    eval_every_steps: int = 100
    eval_windows: int = 200  # validation windows of `context` tokens per set (spread over the set)
    log_every_steps: int = 10
    ckpt_every_steps: int = 100
    keep_checkpoints: int = 2
    sample_every_steps: int = 0  # 0: only at the end
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 48
    compile: bool = False  # torch.compile the model

    def __post_init__(self):
        for key in ("max_steps", "micro_batch_size", "grad_accum", "eval_every_steps", "eval_windows"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "at least 1")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "at least 0 (0: off)")
        check(self.ckpt_every_steps >= 0, "ckpt_every_steps", self.ckpt_every_steps, "at least 0 (0: only at the end)")
