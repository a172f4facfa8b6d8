"""Our DPO loss and its logged metrics agree with TRL's DPOTrainer (trl 1.16) on the same models and batch.

A tiny random policy GPT and a different reference GPT are exported to transformers (GPT2LMHeadModel); a real
``DPOTrainer`` (the policy, an explicit ``ref_model``) computes the loss on the batch its own collator builds
and logs ``rewards/*`` and ``logps/*``. Ours scores the batch ``collate_pairs`` builds from the same token ids:
``sequence_logps`` and ``dpo_loss`` on our GPTs' logits, and ``DPOModule`` (a LoRA policy whose reference is the
adapter switched off) through its training and validation steps. Nothing of TRL's math is mocked.
"""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.dpo.pairs import EncodedPair
from pipeline.dpo.train import DPOModule, DpoLoss, collate_pairs, dpo_loss, sequence_logps
from pipeline.model.export import export_transformers
from pipeline.sft.chat import IGNORE, Encoded
from pipeline.sft.lora import LoraSpec, add_lora, default_targets, merge
from pipeline.tokenizer.build import SpecialTokens, train_bpe
from pipeline.train.module import OptimSpec
from tests.model.conftest import VOCAB, random_model

import trl  # noqa: E402,F401  a dev dependency: missing, the test fails rather than skips
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("hub_offline")]

CONTEXT = 32
# (prompt, chosen reply, rejected reply) lengths: chosen longer, shorter, equal, so rows pad differently
SHAPES = [(5, 4, 9), (9, 7, 3), (3, 6, 6)]
# (loss, beta): IPO's tau = 0.1 puts its loss near (0 - 1 / (2 tau))^2 = 25, 0.5 near 1
LOSSES = [("sigmoid", 0.1), ("ipo", 0.1), ("ipo", 0.5)]
# float32 sums of ~20 log-probabilities of ~-4 each: 1e-5 absolute, and relative 1e-6 for IPO's losses near 25
# (whose float32 spacing is 2e-6)
TOLERANCE = dict(abs=1e-5, rel=1e-6)
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    texts = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 20
    tokenizer = train_bpe(texts, vocab_size=VOCAB, min_frequency=2, special_tokens=SpecialTokens().all())
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def perturbed(model, scale: float, seed: int):
    """A copy of ``model`` with every weight moved a little (a DPO-trained policy's distance from its start)."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model.eval()


def triples(bos: int, eos: int) -> list[dict[str, list[int]]]:
    """Random token ids in TRL's tokenized layout: the prompt starts with BOS, each reply ends with EOS."""
    generator = torch.Generator().manual_seed(2)
    special = len(SpecialTokens().all())

    def ids(n):
        return torch.randint(special, VOCAB, (n,), generator=generator).tolist()

    return [{"prompt_ids": [bos] + ids(p - 1), "chosen_ids": ids(c - 1) + [eos], "rejected_ids": ids(r - 1) + [eos]}
            for p, c, r in SHAPES]


def our_batch(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """The same pairs as our encoding lays them out: labels only on the reply, collated chosen rows first."""
    def encoded(prompt, reply):
        return Encoded(ids=prompt + reply, labels=[IGNORE] * len(prompt) + reply, truncated=False)

    pairs = [EncodedPair(encoded(e["prompt_ids"], e["chosen_ids"]), encoded(e["prompt_ids"], e["rejected_ids"]),
                         pair=None) for e in examples]
    return collate_pairs(pairs, pad_id)


def trl_metrics(policy, reference, tokenizer_json, tmp_path, loss: str, beta: float):
    """(TRL's loss and logged metrics on the batch, that batch as TRL collates it, as we collate it)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    def hf(model, name):
        directory = export_transformers(model, tokenizer_json, tmp_path / name)
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)

    hf_policy, hf_reference = hf(policy, "policy"), hf(reference, "reference")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy", local_files_only=True)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss], report_to=[], use_cpu=True,
                     per_device_train_batch_size=len(SHAPES), max_length=None, activation_checkpointing=False,
                     bf16=False, seed=0)
    # The trainer insists on a train dataset (text, tokenized at construction); the batch below is built apart
    dataset = Dataset.from_dict({"prompt": ["To be"], "chosen": [" or not"], "rejected": [" that is"]})
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_reference, args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    assert trainer.ref_model is not None and trainer.loss_types == [loss] and trainer.beta == beta

    examples = triples(tokenizer.bos_token_id, tokenizer.eos_token_id)
    inputs = trainer.data_collator(examples)
    ours = our_batch(examples, tokenizer.pad_token_id)
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        value = trainer.compute_loss(trainer.model, inputs, return_outputs=False).item()
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return {"loss": value, **metrics}, inputs, ours


def check_layout(inputs, batch) -> None:
    """TRL's collator lays out the same rows as ours, and its completion mask marks exactly our labelled tokens:
    TRL scores completion_mask[..., 1:] against the next-token log-probs, we labels[:, 1:] != -100."""
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    assert torch.equal(inputs["completion_mask"].bool(), batch["labels"] != IGNORE)
    assert torch.equal(inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE), batch["labels"])
    lengths = torch.tensor([p + c for p, c, _ in SHAPES] + [p + r for p, _, r in SHAPES])
    right_padded = torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]
    assert torch.equal(inputs["attention_mask"].bool(), right_padded)  # ours needs none: pads only follow
    assert not inputs["completion_mask"][:, 0].any(), "a scored first token would count in TRL's IPO length only"


def assert_agree(ours: dict[str, float], theirs: dict[str, float]) -> None:
    wrong = {key: (ours[key], theirs[key]) for key in KEYS if ours[key] != pytest.approx(theirs[key], **TOLERANCE)}
    assert not wrong, f"ours vs TRL: {wrong}"
    assert 0 < ours["rewards/accuracies"] < 1, "a batch of all-right or all-wrong pairs would not test accuracy"


@pytest.mark.parametrize("loss,beta", LOSSES)
@torch.no_grad()
def test_dpo_loss_matches_trl(loss, beta, tokenizer_json, tmp_path):
    """sequence_logps and dpo_loss on two separate GPTs, against DPOTrainer with an explicit ref_model."""
    policy = random_model("gpt", seed=0, context=CONTEXT)
    reference = perturbed(policy, scale=0.05, seed=1)
    theirs, inputs, batch = trl_metrics(policy, reference, tokenizer_json, tmp_path, loss, beta)
    check_layout(inputs, batch)

    logps, lengths = sequence_logps(policy(batch["input_ids"])[0], batch["labels"])
    reference_logps, _ = sequence_logps(reference(batch["input_ids"])[0], batch["labels"])
    losses, chosen, rejected = dpo_loss(logps, reference_logps, lengths, DpoLoss(beta=beta, loss=loss))
    chosen_logps, rejected_logps = logps.chunk(2)
    ours = {"loss": losses.mean().item(), "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "logps/chosen": chosen_logps.mean().item(), "logps/rejected": rejected_logps.mean().item()}
    assert_agree(ours, theirs)


@pytest.mark.parametrize("loss,beta", LOSSES)
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Lightning Trainer attached
def test_dpo_module_matches_trl(loss, beta, tokenizer_json, tmp_path):
    """DPOModule's training step (loss, train metrics) and validation step (val metrics), its reference the LoRA
    policy with the adapter off, against DPOTrainer with the merged policy and the base model as ref_model."""
    base = random_model("gpt", seed=0, context=CONTEXT)
    peft_model = add_lora(copy.deepcopy(base), LoraSpec(rank=4, targets=default_targets(base, mlp=True)))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # peft starts B at zero (policy = reference): give the adapter a real update
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    merged = merge(copy.deepcopy(peft_model)).eval()
    theirs, inputs, batch = trl_metrics(merged, base, tokenizer_json, tmp_path, loss, beta)
    check_layout(inputs, batch)

    module = DPOModule(peft_model, OptimSpec(), max_steps=1, spec=DpoLoss(beta=beta, loss=loss))
    module.train()
    train_loss = module.training_step(batch, 0).item()
    train = module.pop_train_metrics()
    module.eval()
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(batch, 0)
    val = module.val_metrics(["train", "held"])
    ours = {"loss": train_loss, "rewards/chosen": train["train/chosen_reward"],
            "rewards/rejected": train["train/rejected_reward"],
            "rewards/accuracies": train["train/reward_accuracy"], "rewards/margins": train["train/reward_margin"],
            "logps/chosen": val["val/chosen_logp"], "logps/rejected": val["val/rejected_logp"]}
    assert_agree(ours, theirs)
    assert val["val/loss"] == pytest.approx(theirs["loss"], **TOLERANCE)
    assert val["val/reward_accuracy"] == pytest.approx(theirs["rewards/accuracies"], **TOLERANCE)
    assert val["val/reward_margin"] == pytest.approx(theirs["rewards/margins"], **TOLERANCE)
    assert val["val/loss"] == val["val_held/loss"]
