"""The DPO objective on a tiny GPT with a LoRA adapter: what a fresh adapter computes, and one step's direction."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.dpo.pairs import EncodedPair, Pair
from pipeline.dpo.train import DpoLoss, DPOModule, collate_pairs, dpo_loss, sequence_logps
from pipeline.model.gpt import GPT, ModelConfig
from pipeline.sft.chat import IGNORE, Encoded
from pipeline.sft.lora import LoraSpec, add_lora
from pipeline.train.module import OptimSpec

VOCAB = 40


def _pair(rng: torch.Generator, prompt: int, chosen: int, rejected: int, k: int) -> EncodedPair:
    def row(reply: int) -> Encoded:
        ids = torch.randint(1, VOCAB, (prompt + reply,), generator=rng).tolist()
        return Encoded(ids, [IGNORE] * prompt + ids[prompt:], False, f"p{k}")
    return EncodedPair(row(chosen), row(rejected), Pair([], "", "", "s", f"p{k}"))


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(0)
    pairs = [_pair(rng, 5, 4, 7, 0), _pair(rng, 3, 6, 2, 1), _pair(rng, 8, 3, 3, 2)]
    return collate_pairs(pairs, pad_id=0)


def _policy(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, context=32, vocab_size=VOCAB))
    return add_lora(model, LoraSpec(rank=4, alpha=8, targets=["attn.qkv", "attn.proj", "mlp.up", "mlp.down"]))


def test_sequence_logps_sum_the_reply_tokens_only_and_ignore_padding(batch):
    torch.manual_seed(1)
    logits = torch.randn(*batch["input_ids"].shape, VOCAB)
    total, count = sequence_logps(logits, batch["labels"])
    logp = torch.log_softmax(logits, -1)
    for row in range(len(total)):
        expected = sum(float(logp[row, t - 1, batch["labels"][row, t]]) for t in range(1, logits.shape[1])
                       if batch["labels"][row, t] != IGNORE)
        assert float(total[row]) == pytest.approx(expected, abs=1e-5)
    assert count.tolist() == [4, 6, 3, 7, 2, 3]  # chosen rows, then rejected rows
    wider = {k: torch.cat([v, torch.full((len(v), 5), 0 if k == "input_ids" else IGNORE)], 1) for k, v in batch.items()}
    assert torch.allclose(sequence_logps(torch.cat([logits, torch.randn(len(logits), 5, VOCAB)], 1),
                                         wider["labels"])[0], total)


def test_a_fresh_adapter_is_the_reference_so_the_loss_is_log_2_and_the_rewards_zero(batch):
    module = DPOModule(_policy(), OptimSpec(), 10, DpoLoss(beta=0.5))
    policy, reference, lengths = module.scores(batch)
    assert torch.equal(policy, reference)
    losses, chosen, rejected = dpo_loss(policy, reference, lengths, module.spec)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert not chosen.any() and not rejected.any()
    ipo, _, _ = dpo_loss(policy, reference, lengths, DpoLoss(beta=0.5, loss="ipo"))
    assert torch.allclose(ipo, torch.full_like(ipo, (1 / (2 * 0.5)) ** 2))


def test_label_smoothing_weighs_the_flipped_preference():
    policy = torch.tensor([-1.0, -3.0])  # one pair: chosen, rejected
    reference = torch.tensor([-2.0, -2.0])
    lengths = torch.tensor([3, 3])
    plain, _, _ = dpo_loss(policy, reference, lengths, DpoLoss(beta=1.0))
    flipped, _, _ = dpo_loss(policy.flip(0), reference, lengths, DpoLoss(beta=1.0))
    smoothed, _, _ = dpo_loss(policy, reference, lengths, DpoLoss(beta=1.0, label_smoothing=0.2))
    assert float(plain) == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))))
    assert float(smoothed) == pytest.approx(0.8 * float(plain) + 0.2 * float(flipped))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_one_step_with_a_large_beta_moves_the_chosen_reply_up_and_the_rejected_down(batch, loss):
    module = DPOModule(_policy(), OptimSpec(), 10, DpoLoss(beta=50.0, loss=loss))
    with torch.no_grad(), module.model.disable_adapter():
        reference_before = sequence_logps(module(batch), batch["labels"])[0]
    policy, reference, lengths = module.scores(batch)
    before_chosen, before_rejected = policy.detach().chunk(2)
    losses, _, _ = dpo_loss(policy, reference, lengths, module.spec)
    losses.mean().backward()
    trained = [p for p in module.model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained) and any(p.grad.abs().sum() > 0 for p in trained)
    optimizer = torch.optim.SGD(trained, lr=1e-3)
    optimizer.step()
    with torch.no_grad():
        after_policy, after_reference, _ = module.scores(batch)
    after_chosen, after_rejected = after_policy.chunk(2)
    assert torch.equal(after_reference, reference_before), "the reference (adapter off) did not move"
    assert (after_chosen > before_chosen).all(), (before_chosen, after_chosen)
    assert (after_rejected < before_rejected).all(), (before_rejected, after_rejected)


def test_the_module_validates_per_source_and_reports_kl_zero_before_training(batch):
    module = DPOModule(_policy(), OptimSpec(), 10, DpoLoss(beta=0.1))
    module.on_validation_epoch_start()
    module.validation_step(batch, 0, dataloader_idx=0)
    module.validation_step(batch, 0, dataloader_idx=1)
    metrics = module.val_metrics(["all", "a", "b"], prefix="before")
    assert metrics["before/kl"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["before/loss"] == pytest.approx(math.log(2)) and metrics["before_a/reward_accuracy"] == 0.0
    chosen, rejected = sequence_logps(module(batch), batch["labels"])[0].chunk(2)
    assert metrics["before_b/chosen_logp"] == pytest.approx(float(chosen.mean()), rel=1e-5)
    assert metrics["before/ranking_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
