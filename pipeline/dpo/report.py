"""What a DPO run reports: the SFT model against the DPO model on held-out preference pairs.

``comparison.md``: the held-out measures before training (the SFT model: the adapter is fresh, so the
policy is the reference) and after, per source; then greedy replies of both models to held-out prompts
beside the replies people chose and rejected.
"""
from __future__ import annotations

import math
from typing import Union

from tokenizers import Tokenizer
from torch import nn

from pipeline.dpo.pairs import PreferenceData
from pipeline.sft.chat import ChatTemplate
from pipeline.sft.generation import cell, generate_replies, last_user
from pipeline.tokenizer.build import SpecialTokens


def delta_table(metrics: dict[str, float], sources: list[str]) -> str:
    """SFT (before) against DPO (after) on the held-out pairs, one row per measure and source."""
    rows = [("ranking accuracy (chosen more likely)", "ranking_accuracy"),
            ("reward accuracy (chosen higher implicit reward)", "reward_accuracy"),
            ("reward margin", "reward_margin"), ("log p(chosen), per pair", "chosen_logp"),
            ("log p(rejected), per pair", "rejected_logp"), ("KL to the SFT model, nats/token", "kl"),
            ("DPO loss", "loss")]
    lines = ["| held-out pairs | measure | SFT | DPO |", "|---|---|---:|---:|"]
    for name, infix in [("all", ""), *[(s, f"_{s}") for s in sources]]:
        for label, key in rows:
            before, after = metrics.get(f"before{infix}/{key}"), metrics.get(f"val{infix}/{key}")
            if before is not None and after is not None and not math.isnan(after):
                lines.append(f"| {name} | {label} | {before:.3f} | {after:.3f} |")
    return "\n".join(lines) + "\n"



def comparison(policy: nn.Module, data: PreferenceData, metrics: dict[str, float], tokenizer: Tokenizer,
               template: Union[str, ChatTemplate], special: SpecialTokens, per_source: int, max_new_tokens: int,
               max_chars: int = 200) -> str:
    """The Markdown of comparison.md: ``delta_table``, then the first ``per_source`` held-out prompts of each
    source answered by the SFT model (``policy`` with its adapter off) and by the DPO model."""
    text = ("# SFT against DPO on held-out preference pairs\n\n" + delta_table(metrics, list(data.val))
            + "\nSFT column: the adapter is fresh, so the policy is the reference and every implicit reward is 0: "
              "reward accuracy and margin are 0 by construction (ties), and DPO's reward accuracy compares with 0.5, "
              "chance. Ranking accuracy (the chosen reply is the more likely one) is the same measure for both "
              "models.\n")
    pairs = [p.pair for pairs in data.val.values() for p in pairs[:per_source]]
    if not pairs:
        return text
    conversations = [p.conversation(p.chosen) for p in pairs]
    args = (tokenizer, conversations, template, special.bos, special.eos, max_new_tokens)
    dpo = generate_replies(policy, *args).replies
    with policy.disable_adapter():
        sft = generate_replies(policy, *args).replies
    lines = ["", "## Greedy replies to held-out prompts", "",
             "| id | prompt (last user turn) | chosen | rejected | SFT | DPO |", "|---|---|---|---|---|---|"]
    for pair, sft_reply, dpo_reply in zip(pairs, sft, dpo):
        cells = (pair.id, last_user(pair.prompt), pair.chosen, pair.rejected, sft_reply, dpo_reply)
        lines.append("| " + " | ".join(cell(c, max_chars) for c in cells) + " |")
    return text + "\n".join(lines) + "\n"
