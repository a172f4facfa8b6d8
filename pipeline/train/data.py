"""Training data from memory-mapped token shards: random windows for training, fixed windows for validation.

The windows of optimizer step s are a pure function of (seed, s), so a run resumed at step s sees
exactly the data an uninterrupted run would, and a DDP job splits each step's global batch between
ranks the same way a single process would take it whole.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.shards import open_shards
from pipeline.errors import BadInput


class TrainWindows(Dataset):
    """Item k is micro-batch k of this rank: (micro_batch, context + 1) token ids from random offsets.

    Step s draws ``micro_batch * accumulate * world_size`` window starts from Generator([seed, s]);
    micro-batch m of rank r takes the slice at (m * world_size + r) * micro_batch.
    """

    def __init__(self, shards: list[np.ndarray], context: int, micro_batch: int, accumulate: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.shards = [s for s in shards if len(s) > context + 1]
        if not self.shards:
            longest = max((len(s) for s in shards), default=0)
            raise BadInput(f"no training shard is longer than the context + 1 ({context + 1} tokens; the longest "
                           f"has {longest}): lower model.context or add data")
        sizes = np.array([len(s) - context - 1 for s in self.shards], dtype=np.float64)
        self.shard_p = sizes / sizes.sum()
        self.context, self.micro_batch, self.accumulate = context, micro_batch, accumulate
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def tokens_per_step(self) -> int:
        return self.context * self.micro_batch * self.accumulate * self.world_size

    def __len__(self) -> int:
        return 2**62  # endless; the trainer stops at max_steps

    def step_starts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        n = self.micro_batch * self.accumulate * self.world_size
        which = rng.choice(len(self.shards), size=n, p=self.shard_p)
        room = np.array([len(self.shards[i]) - self.context - 1 for i in which])
        return which, (rng.random(n) * (room + 1)).astype(np.int64)

    def __getitem__(self, k: int) -> torch.Tensor:
        step, micro = divmod(k, self.accumulate)
        which, starts = self.step_starts(step)
        first = (micro * self.world_size + self.rank) * self.micro_batch
        rows = [self.shards[which[i]][starts[i]:starts[i] + self.context + 1] for i in range(first, first + self.micro_batch)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


class FromStep(Sampler):
    """Micro-batch indices from ``start`` on, so a resumed run continues the same sequence."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        k = self.start
        while True:
            yield k
            k += 1

    def __len__(self) -> int:
        return 2**62


class ValWindows(Dataset):
    """Consecutive windows of context + 1 tokens stepping by context: each token after the first is
    predicted once, with up to ``context`` tokens before it. At most ``max_windows``, spread evenly."""

    def __init__(self, shards: list[np.ndarray], context: int, max_windows: int):
        self.items = [(i, start) for i, s in enumerate(shards) for start in range(0, len(s) - context, context)]
        if len(self.items) > max_windows:
            keep = np.linspace(0, len(self.items) - 1, max_windows).round().astype(int)
            self.items = [self.items[i] for i in keep]
        self.shards, self.context = shards, context

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> torch.Tensor:
        i, start = self.items[k]
        return torch.from_numpy(self.shards[i][start:start + self.context + 1].astype(np.int64))


def shard_arrays(stage_dir: Path, shard_index: dict, split: str) -> list[np.ndarray]:
    return [s.tokens for s in open_shards(stage_dir, shard_index, split)]


class TokenDataModule(pl.LightningDataModule):
    """Train windows from ``train`` shards; one validation loader per named set (``val`` first)."""

    def __init__(self, train: list[np.ndarray], val_sets: dict[str, list[np.ndarray]], context: int,
                 micro_batch: int, accumulate: int, seed: int, eval_windows: int):
        super().__init__()
        self.train, self.val_sets = train, val_sets
        self.context, self.micro_batch, self.accumulate, self.seed = context, micro_batch, accumulate, seed
        self.eval_windows = eval_windows
        for name, arrays in val_sets.items():
            if not len(ValWindows(arrays, context, eval_windows)):
                raise BadInput(f"validation set '{name}' has fewer than context + 1 = {context + 1} tokens")

    def train_windows(self) -> TrainWindows:
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        return TrainWindows(self.train, self.context, self.micro_batch, self.accumulate, self.seed, rank, world)

    def train_dataloader(self) -> DataLoader:
        # Called after a checkpoint is restored, so global_step is where the run resumes.
        start = self.trainer.global_step * self.accumulate if self.trainer else 0
        return DataLoader(self.train_windows(), batch_size=None, sampler=FromStep(start))

    def val_dataloader(self) -> list[DataLoader]:
        # Every rank scores every window: validation is small, and the numbers then agree everywhere.
        return [DataLoader(ValWindows(arrays, self.context, self.eval_windows), batch_size=self.micro_batch)
                for arrays in self.val_sets.values()]
