"""The energy tracker's cost: pretrain's training tokens/s with codecarbon's tracker running vs without.

Both sides train the same model on the same windows with the pretrain stage's Lightning step (as pretrain_step's
candidate side); the candidate starts ``EnergyMeter`` (what the stage contract starts around every stage run, with
its sampling interval) before the Trainer and stops it after. Runs alternate, the first side swapped each round;
the ratio reported is the median of the rounds' paired ratios (each round's two runs are adjacent in time, so a
drift in the shared machine's load cancels), with their range. Each run spans several of the tracker's 15-second
sampling intervals (and its once-a-second utilisation samples), so their cost is counted.
"""
from __future__ import annotations

import dataclasses
import statistics

import numpy as np
import torch

from pipeline.bench.pretrain_step import (StepTimer, bench_trainer, demo_shards, quiet_lightning, sigterm_fails,
                                          tokenizer_vocab)
from pipeline.config import compose
from pipeline.data.shards import token_dtype
from pipeline.tracking.energy import MEASURE_EVERY_S, EnergyMeter
from pipeline.train.data import TokenDataModule, shard_arrays
from pipeline.train.module import LanguageModel

GOAL = 0.98  # the tracker should cost at most 2% of training throughput


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    quiet_lightning()
    cfg = compose(*(["model=tiny"] if quick else []), *overrides)
    train, settings = cfg.pretrain, cfg.tracking
    untimed, steps, rounds = (2, 20, 2) if quick else (5, 120, 5)
    max_steps = untimed + steps
    found = demo_shards(cfg)
    if found:
        stage_dir, manifest = found
        shards, vocab = shard_arrays(stage_dir, manifest["outputs"]["shards"], "train"), tokenizer_vocab(*found)
    else:  # step speed does not depend on what the ids mean
        vocab = cfg.tokenizer.vocab_size
        shards = [np.random.default_rng(cfg.seed).integers(0, vocab, size=2_000_000).astype(token_dtype(vocab))]
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    readings = []

    def train_once(metered: bool) -> float:
        datamodule = TokenDataModule(shards, {}, model_cfg.context, train.micro_batch_size, 1, cfg.seed,
                                     train.eval_windows)
        torch.manual_seed(cfg.seed)
        module = LanguageModel(model_cfg.as_dict(), train.optim.as_dict(), max_steps, train.compile)
        timer = StepTimer(first=untimed, last=max_steps - 1)
        meter = EnergyMeter(settings.energy_country, settings.energy_region, settings.carbon_intensity) if metered \
            else None
        try:
            with sigterm_fails("energy_overhead"):
                bench_trainer(cfg.trainer, max_steps, train.grad_clip, [timer]).fit(module, datamodule=datamodule)
        finally:
            if meter:
                readings.append(meter.stop())
        return train.micro_batch_size * model_cfg.context * steps / timer.seconds

    runs = {False: [], True: []}
    for r in range(rounds):
        for metered in ((False, True) if r % 2 == 0 else (True, False)):
            runs[metered].append(train_once(metered))
    base, cand = statistics.median(runs[False]), statistics.median(runs[True])
    paired = [c / b for b, c in zip(runs[False], runs[True])]
    ratio = statistics.median(paired)
    share = tracker_cpu_share(settings)
    last = readings[-1]
    return {
        "name": "energy_overhead",
        "what": "pretrain training tokens/s with codecarbon's offline tracker running vs without",
        "model": {k: getattr(model_cfg, k) for k in ("n_layer", "d_model", "context", "vocab_size")},
        "timed_steps": steps, "rounds": rounds, "tracker_interval_s": MEASURE_EVERY_S,
        "baseline": {"name": "no tracker", "tokens_per_s": round(base, 1), "runs": [round(x, 1) for x in runs[False]]},
        "candidate": {"name": "EnergyMeter running", "tokens_per_s": round(cand, 1),
                      "runs": [round(x, 1) for x in runs[True]]},
        "energy_of_last_run": last.as_dict() if last else None,
        "paired_ratios": [round(x, 3) for x in paired],
        # The tracker's own work, timed call by call: a bound on its cost that the machine's noise does not blur.
        "tracker_cpu_share": share,
        "ratio_of_medians": round(cand / base, 3),
        "note": f"paired ratios {min(paired):.3f}-{max(paired):.3f}; the tracker's own work "
                f"{share['per_second_ms']:.2f} ms/s ({share['share_of_one_core']:.2%} of a core); last metered run: {last.kwh:.3g} kWh over "
                f"{last.duration_s:.0f} s ({last.power_source})" if last else "codecarbon gave no reading",
        "overrides": list(overrides),
        "ratio": round(ratio, 3),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
    }


def tracker_cpu_share(settings, repeats: int = 20) -> dict:
    """codecarbon's work per second of tracking, timed directly: its once-a-second utilisation sample plus a
    fifteenth of its power-and-energy measurement (codecarbon's own methods, called as its timers call them)."""
    import time

    meter = EnergyMeter(settings.energy_country, settings.energy_region, settings.carbon_intensity)
    tracker = meter._tracker
    try:
        timed = {}
        for name in ("_monitor_power", "_measure_power_and_energy"):
            start = time.perf_counter()
            for _ in range(repeats):
                getattr(tracker, name)()
            timed[name] = (time.perf_counter() - start) / repeats * 1000
    finally:
        meter.stop()
    per_second = timed["_monitor_power"] + timed["_measure_power_and_energy"] / MEASURE_EVERY_S
    return {"sample_ms": round(timed["_monitor_power"], 3), "measure_ms": round(timed["_measure_power_and_energy"], 3),
            "per_second_ms": round(per_second, 3), "share_of_one_core": round(per_second / 1000, 5)}
