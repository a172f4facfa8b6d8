"""Training windows: a pure function of (seed, step), split between ranks as one process would take them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import BadInput
from pipeline.train.data import FromStep, TrainWindows, ValWindows

SHARDS = [np.arange(1000, dtype=np.uint16), np.arange(5000, 5300, dtype=np.uint16)]


def test_windows_are_slices_of_the_shards_and_repeat_by_step():
    ds = TrainWindows(SHARDS, context=16, micro_batch=4, accumulate=2, seed=7)
    first, again, other = ds[0], TrainWindows(SHARDS, 16, 4, 2, seed=7)[0], ds[2]
    assert first.shape == (4, 17) and first.dtype == torch.int64
    assert torch.equal(first, again) and not torch.equal(first, other)
    diffs = first[:, 1:] - first[:, :-1]
    assert torch.all(diffs == 1), "each window is a contiguous run of one shard"


def test_ranks_split_each_step_as_a_single_process_would_take_it():
    single = TrainWindows(SHARDS, context=8, micro_batch=4, accumulate=1, seed=3)
    ranks = [TrainWindows(SHARDS, context=8, micro_batch=2, accumulate=1, seed=3, rank=r, world_size=2)
             for r in range(2)]
    for step in range(3):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), single[step])


def test_accumulation_splits_a_step_into_its_micro_batches():
    whole = TrainWindows(SHARDS, context=8, micro_batch=6, accumulate=1, seed=1)
    parts = TrainWindows(SHARDS, context=8, micro_batch=2, accumulate=3, seed=1)
    assert torch.equal(torch.cat([parts[3], parts[4], parts[5]]), whole[1])


def test_resumed_sampler_continues_the_sequence():
    it = iter(FromStep(42))
    assert [next(it) for _ in range(3)] == [42, 43, 44]


def test_validation_windows_cover_the_set_once_and_can_be_capped():
    windows = ValWindows([np.arange(101)], context=10, max_windows=100)
    assert len(windows) == 10
    assert torch.equal(torch.cat([windows[i][1:] for i in range(10)]), torch.arange(1, 101))
    assert len(ValWindows([np.arange(101)], context=10, max_windows=4)) == 4


def test_shards_shorter_than_a_window_are_a_clear_error():
    with pytest.raises(BadInput, match="longer than the context"):
        TrainWindows([np.arange(10)], context=16, micro_batch=2, accumulate=1, seed=0)
