"""LoRA-DPO against LoRA-SFT on the same model and the same tokens: tokens/s.

Both arms train a fresh LoRA adapter (``dpo.lora``) on the same model (conf/model/, the demo's mini; tiny in
--quick; identical initial weights) through the stages' Lightning path, on the same real rows: the HH-RLHF
pairs that fit the context, each pair's chosen and rejected conversation rendered with the chat template.
The SFT arm (``SFTModule``) takes the 2B rows of B pairs as 2B conversations; the DPO arm (``DPOModule``)
takes them as B pairs, and on top of SFT's forward and backward pass runs a forward pass without gradients
through the reference (the adapter off). The ideal ratio is then about 3/4 (a backward pass costs about two
forward passes); the goal is 0.45.

Tokens are real (non-pad) tokens of the rows, the same in both arms. Each arm runs untimed steps first, the
clock covers the next ones; the arms alternate, the order reversed every other round, and the median round
is reported.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.bench.pretrain_step import StepTimer, bench_trainer, quiet_lightning, sigterm_fails
from pipeline.bench.sft_lora import bench_tokenizer
from pipeline.config import compose
from pipeline.dpo.pairs import encode_pairs, read_hh_rlhf
from pipeline.dpo.train import DpoLoss, DPOModule, PairBatches
from pipeline.errors import BadInput
from pipeline.model.gpt import GPT
from pipeline.sft.chat import add_chat_tokens
from pipeline.sft.lora import add_lora
from pipeline.sft.train import SFTModule
from pipeline.train.data import FromStep
from pipeline.tokenizer.build import vocab_bound

GOAL = 0.45  # LoRA-DPO real tokens/s over LoRA-SFT's
SOURCE = "preference/hh_rlhf/harmless-base-test.jsonl.gz"
TEMPLATE = "chatml"
QUICK = ["model=tiny", "model.context=256", "dpo.micro_batch_size=4"]


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    quiet_lightning()
    cfg = compose(*(QUICK if quick else []), *overrides)
    d, special = cfg.dpo, cfg.tokenizer.special_tokens
    tokenizer, tokenizer_name = bench_tokenizer(cfg)
    add_chat_tokens(tokenizer, TEMPLATE)
    pad_id = tokenizer.token_to_id(special.pad)
    if pad_id is None:
        raise BadInput(f"{tokenizer_name} has no pad token {special.pad!r} (tokenizer.special_tokens.pad)")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_bound(tokenizer))
    read = read_hh_rlhf(str(Path(cfg.paths.data_dir) / SOURCE), "hh")
    pairs, counts = encode_pairs(read.conversations, tokenizer, TEMPLATE, model_cfg.context, special.bos, special.eos)
    untimed, steps, rounds = (1, 4, 2) if quick else (2, 10, 3)
    max_steps = untimed + steps
    micro = d.micro_batch_size
    batches = PairBatches(pairs, micro, cfg.seed, pad_id)  # item k: 2B padded rows, B chosen then B rejected
    tokens = sum(int((batches[k]["input_ids"] != pad_id).sum()) for k in range(untimed, max_steps))

    def arm(name: str) -> tuple[float, float]:
        """Real tokens/s and the final loss of one arm; both read the very same batches."""
        torch.manual_seed(cfg.seed)
        model = add_lora(GPT(model_cfg), d.lora)
        if name == "dpo":
            module = DPOModule(model, d.optim, max_steps, DpoLoss(d.beta, d.loss, d.label_smoothing))
        else:  # the 2B rows as 2B conversations, replies trained
            module = SFTModule(model, d.optim, max_steps, adapters_only=True)
        timer = StepTimer(first=untimed, last=max_steps - 1)
        trainer = bench_trainer(cfg.trainer, max_steps, d.grad_clip, [timer])
        with sigterm_fails("dpo_lora"):
            trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, sampler=FromStep(0)))
        return tokens / timer.seconds, timer.final_loss

    load = [os.getloadavg()[0]]
    runs: dict[str, list[float]] = {"sft": [], "dpo": []}
    for r in range(rounds):
        for name in (["sft", "dpo"] if r % 2 == 0 else ["dpo", "sft"]):
            runs[name].append(arm(name)[0])
    load.append(os.getloadavg()[0])
    sft, dpo = (statistics.median(runs[n]) for n in ("sft", "dpo"))
    ratio = dpo / sft
    return {
        "name": "dpo_lora",
        "what": "LoRA-DPO vs LoRA-SFT on the same model and rows: real tokens/s (DPO adds a reference forward pass)",
        "data": f"HH-RLHF ({SOURCE}): {counts['kept']} pairs fit {model_cfg.context} tokens, "
                f"{counts['dropped_too_long']} left out; template {TEMPLATE}",
        "tokenizer": tokenizer_name,
        "model": {k: getattr(model_cfg, k) for k in ("n_layer", "n_head", "d_model", "d_ff", "context", "vocab_size")},
        "pairs_per_micro_batch": micro, "rows_per_micro_batch": 2 * micro, "untimed_steps": untimed,
        "timed_steps": steps, "rounds": rounds, "torch_threads": torch.get_num_threads(),
        "load_average_1min": [round(x, 2) for x in load],
        "baseline": {"name": "LoRA-SFT on the pairs' rows", "tokens_per_s": round(sft, 1),
                     "runs": [round(x, 1) for x in runs["sft"]]},
        "candidate": {"name": "LoRA-DPO on the pairs", "tokens_per_s": round(dpo, 1),
                      "runs": [round(x, 1) for x in runs["dpo"]]},
        "note": "ideal about 0.75 (forward + backward + a reference forward, against forward + backward)",
        "overrides": list(overrides),
        "ratio": round(ratio, 3),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
    }

