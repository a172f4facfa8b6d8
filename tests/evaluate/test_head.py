"""Task heads on a frozen model and on a LoRA-tuned copy: features against a hand computation and against the
transformers export, a word rule learnt while shuffled labels stay at chance, the model untouched, reruns
identical, bad rows named, the report's table."""
from __future__ import annotations

import copy
import os
import random
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import BadInput, ConfigError
from pipeline.evaluate.head import (HeadResult, HeadSpec, draw_subset, encode_sentences, head_report, read_split,
                                    sentence_features, train_heads)
from pipeline.evaluate.models import ScoredModel, transformers_model
from pipeline.evaluate.prompting import Example, read_sst2
from pipeline.model.export import export_transformers
from pipeline.model.gpt import GPT, ModelConfig
from pipeline.tokenizer.build import byte_tokenizer

EOS = 256  # byte_tokenizer(["</s>", "<s>", "<pad>"]): ids 0..255 are the bytes, then the special tokens
MARKER = " zzq"  # in no SST-2 training sentence


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer(["</s>", "<s>", "<pad>"])


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, d_ff=64, context=128, vocab_size=260)).eval()


@pytest.fixture(scope="module")
def tiny(gpt, tokenizer):
    return ScoredModel("tiny", lambda ids: gpt(ids)[0], tokenizer, EOS, gpt.cfg.context,
                       sum(p.numel() for p in gpt.parameters()), gpt, "pipeline")


@pytest.fixture(scope="module")
def exported(gpt, tokenizer, tmp_path_factory) -> ScoredModel:
    """The same weights as a transformers GPT2LMHeadModel, loaded as the evaluate stage loads any export."""
    work = tmp_path_factory.mktemp("export")
    tokenizer.save(str(work / "tokenizer.json"))
    directory = export_transformers(gpt, work / "tokenizer.json", work / "hf")
    return transformers_model("hf", directory, "</s>", "cpu")


def hand_features(gpt: GPT, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(last, mean) of one sentence, alone: embeddings, every block, the final norm, run here step by step."""
    x = torch.tensor([ids])
    with torch.no_grad():
        h = gpt.tok_emb(x) + gpt.pos_emb(torch.arange(len(ids)))
        for block in gpt.blocks:
            h, _ = block(h, None, None)
        h = gpt.norm(h)[0]
    return h[-1], h.mean(0)


SENTENCES = ["a gripping , funny film .", "dull", "", "it 's a charming and often affecting journey . " * 2]


def test_features_are_the_final_norm_of_each_sentence_alone(tiny, gpt):
    encoded = encode_sentences(tiny, [Example({"sentence": s}, 0) for s in SENTENCES])
    assert [ids[0] for ids in encoded.ids] == [EOS] * len(SENTENCES)  # the prefix, as documents in training
    assert encoded.ids[1] == [EOS, *b"dull"]
    by_hand = [hand_features(gpt, ids) for ids in encoded.ids]
    for pooling, which in (("last", 0), ("mean", 1)):
        # batches of 3 of different lengths: the shorter rows are padded, which must change nothing
        got = sentence_features(gpt, "pipeline", encoded.ids, EOS, pooling, batch_size=3, device="cpu")
        assert got.shape == (len(SENTENCES), gpt.cfg.d_model)
        for row, hand in zip(got, by_hand):
            torch.testing.assert_close(row, hand[which], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_hand[0][0], by_hand[0][1])  # last and mean differ: the test can tell them apart


def test_long_sentences_keep_their_start_and_are_counted(tiny):
    long = "x" * 200
    encoded = encode_sentences(tiny, [Example({"sentence": long}, 1), Example({"sentence": "ok"}, 0)])
    assert encoded.ids[0] == [EOS, *b"x" * (tiny.context - 1)]
    assert encoded.truncated == 1 and encoded.labels.tolist() == [1, 0]


def test_transformers_export_gives_our_features(tiny, gpt, exported):
    encoded = encode_sentences(tiny, [Example({"sentence": s}, 0) for s in SENTENCES])
    assert exported.kind == "transformers" and exported.prefix_id == EOS
    for pooling in ("last", "mean"):
        ours = sentence_features(gpt, "pipeline", encoded.ids, EOS, pooling, 3, "cpu")
        theirs = sentence_features(exported.network, "transformers", encoded.ids, EOS, pooling, 3, "cpu")
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # the backbone's output is what output_hidden_states reports last, after the final norm
    ids = torch.tensor([encoded.ids[0]])
    with torch.no_grad():
        last = exported.network(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(last, sentence_features(exported.network, "transformers", encoded.ids[:1], EOS,
                                                       "last", 1, "cpu")[0], atol=1e-6, rtol=1e-6)


def test_subsets_are_drawn_by_seed_in_file_order():
    examples = [Example({"sentence": str(i)}, i % 2) for i in range(50)]
    a, b = draw_subset(examples, 20, seed=3), draw_subset(examples, 20, seed=3)
    assert a == b and len(a) == 20
    picked = [int(e.fields["sentence"]) for e in a]
    assert picked == sorted(picked) and len(set(picked)) == 20
    assert a != draw_subset(examples, 20, seed=4)
    assert draw_subset(examples, None, 0) == examples == draw_subset(examples, 80, 0)


# ---- a toy task made of real SST-2 rows -----------------------------------------------------------

def write_tsv(path: Path, rows: list[tuple[str, int]]) -> str:
    path.write_text("".join(f"{s}\t{y}\n" for s, y in rows))
    return str(path)


@pytest.fixture(scope="module")
def word_rule(data_dir, tmp_path_factory) -> dict[str, str]:
    """Short real SST-2 training sentences whose label is 1 exactly when MARKER ends them (half of them), split
    300 / 100 / 100; and the training file with its labels shuffled."""
    sentences = [e.fields["sentence"] for e in read_sst2(data_dir / "eval" / "sst2" / "train.tsv")
                 if len(e.fields["sentence"]) <= 100][:500]
    assert not any(MARKER.strip() in s for s in sentences)
    rows = [(s + MARKER if i % 2 else s, i % 2) for i, s in enumerate(sentences)]
    shuffled = [y for _, y in rows[:300]]
    torch.manual_seed(0)
    shuffled = [shuffled[i] for i in torch.randperm(300).tolist()]
    work = tmp_path_factory.mktemp("word_rule")
    return {"train_path": write_tsv(work / "train.tsv", rows[:300]),
            "dev_path": write_tsv(work / "dev.tsv", rows[300:400]),
            "test_path": write_tsv(work / "test.tsv", rows[400:]),
            "shuffled_path": write_tsv(work / "shuffled.tsv", [(s, y) for (s, _), y in zip(rows[:300], shuffled)])}


def toy_spec(files: dict[str, str], **changes) -> HeadSpec:
    spec = HeadSpec(train_path=files["train_path"], dev_path=files["dev_path"], test_path=files["test_path"],
                    train_limit=None, pooling="last", epochs=10, lr=1e-2, lora_steps=15, lora_lr=3e-3)
    return replace(spec, **changes)


def test_the_head_learns_a_word_rule_and_not_shuffled_labels(tiny, word_rule, tmp_path):
    learnt = train_heads(tiny, toy_spec(word_rule, lora=False), tmp_path, "cpu")
    assert (learnt.n_train, learnt.n_dev, learnt.n_test, learnt.truncated) == (300, 100, 100, 0)
    assert learnt.frozen_dev >= 0.95 and learnt.frozen_test >= 0.95
    assert learnt.majority_dev == pytest.approx(0.5) and learnt.lora_dev is None

    control = train_heads(tiny, toy_spec(word_rule, train_path=word_rule["shuffled_path"], lora=False), tmp_path,
                          "cpu")
    assert abs(control.frozen_dev - 0.5) <= 0.12 and abs(control.frozen_test - 0.5) <= 0.12
    assert control.frozen_train_loss > learnt.frozen_train_loss + 0.2
    assert list(tmp_path.iterdir()) == []  # Lightning wrote nothing: no logs, no checkpoints


def test_lora_leaves_the_model_as_it_was_and_reruns_agree(tiny, gpt, word_rule, tmp_path):
    before = copy.deepcopy(gpt.state_dict())
    grads = {n: p.requires_grad for n, p in gpt.named_parameters()}
    probe = torch.tensor([[EOS, *b"a fine film"]])
    logits = tiny.logits_fn(probe).detach().clone()

    spec = toy_spec(word_rule, lora_head="fresh", lora_lr=1e-2, lora_steps=30)
    first = train_heads(tiny, spec, tmp_path, "cpu")
    assert first.lora_dev >= 0.9 and first.lora_test >= 0.9  # a fresh head learns the rule through the adapters
    rank, d, layers = spec.lora_r, gpt.cfg.d_model, gpt.cfg.n_layer
    # A (rank, in) and B (out, rank) on qkv (d -> 3d) and proj (d -> d), and the head's weight and bias
    assert first.lora_trainable == layers * rank * (d + 3 * d + d + d) + 2 * d + 2

    generators = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    seed_env = os.environ.get("PL_GLOBAL_SEED")
    second = train_heads(tiny, spec, tmp_path, "cpu")
    # seed_everything inside did not reseed what the caller (the next model's evaluation) draws from
    assert random.getstate() == generators[0] and np.array_equal(np.random.get_state()[1], generators[1])
    assert torch.equal(torch.get_rng_state(), generators[2]) and os.environ.get("PL_GLOBAL_SEED") == seed_env
    timing = ("features_seconds", "frozen_seconds", "lora_seconds")
    assert {k: v for k, v in asdict(first).items() if k not in timing} == \
           {k: v for k, v in asdict(second).items() if k not in timing}

    after = gpt.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in gpt.named_parameters()} == grads and not gpt.training
    assert not any("lora" in name for name, _ in gpt.named_modules())
    assert torch.equal(tiny.logits_fn(probe), logits)  # still usable by every other evaluation


def test_a_transformers_model_trains_both_heads_and_stays_as_it_was(tiny, exported, word_rule, tmp_path):
    before = {k: v.clone() for k, v in exported.network.state_dict().items()}
    spec = toy_spec(word_rule, lora_steps=5)
    theirs, ours = train_heads(exported, spec, tmp_path, "cpu"), train_heads(tiny, spec, tmp_path, "cpu")
    # the same features, so the same frozen head, up to float rounding
    assert theirs.frozen_dev == ours.frozen_dev and theirs.frozen_test == ours.frozen_test
    assert theirs.frozen_train_loss == pytest.approx(ours.frozen_train_loss, abs=1e-4)
    assert theirs.lora_dev >= 0.9 and theirs.lora_trainable == ours.lora_trainable
    assert all(torch.equal(v, before[k]) for k, v in exported.network.state_dict().items())


# ---- bad input and the report ---------------------------------------------------------------------

def test_bad_rows_and_settings_are_named(tmp_path):
    empty = tmp_path / "train.tsv"
    empty.write_text("a fine film\t1\n\t0\n")
    with pytest.raises(BadInput, match=rf"{empty}, line 2: the sentence is empty"):
        read_split(str(empty), "train_path")
    blank = tmp_path / "blank.tsv"
    blank.write_text("good\t1\n   \t1\n")
    with pytest.raises(BadInput, match=rf"{blank}, line 2"):
        read_split(str(blank), "train_path")
    label = tmp_path / "label.tsv"
    label.write_text("good\t1\nbad\tnegative\n")
    with pytest.raises(BadInput, match=rf"{label}, line 2: label 'negative' is not 0 or 1"):
        read_split(str(label), "dev_path")
    with pytest.raises(BadInput, match="evaluate.head.test_path is not set"):
        read_split(None, "test_path")
    (tmp_path / "none.tsv").write_text("")
    with pytest.raises(BadInput, match="none.tsv holds no examples"):
        read_split(str(tmp_path / "none.tsv"), "dev_path")
    with pytest.raises(ConfigError, match="'pooling' is 'first'"):
        HeadSpec(pooling="first")
    with pytest.raises(ConfigError, match="'train_limit' is 0"):
        HeadSpec(train_limit=0)


def result(frozen: float, lora, majority: float = 0.5) -> HeadResult:
    return HeadResult(frozen_dev=frozen, frozen_test=frozen - 0.01, lora_dev=lora, lora_test=lora and lora - 0.02,
                      majority_dev=majority, majority_test=0.499, n_train=2000, n_dev=872, n_test=1821, truncated=0,
                      frozen_train_loss=0.6, lora_train_loss=None, lora_trainable=0, head_trainable=258,
                      features_seconds=1.0, frozen_seconds=2.0, lora_seconds=3.25)


def test_the_report_puts_the_three_kinds_side_by_side():
    markdown, metrics = head_report([("pretrain", result(0.6, 0.625)), ("sft", result(0.55, None))],
                                    {"pretrain": 0.512}, HeadSpec(), prompting_examples=300)
    lines = markdown.splitlines()
    assert lines[0].startswith("| model | prompting, 0-shot (dev) | frozen + linear head (dev / test) | "
                               "LoRA + head (dev / test) | majority (dev / test) |")
    assert lines[2] == "| pretrain | 0.512 | 0.600 / 0.590 | 0.625 / 0.605 | 0.500 / 0.499 | 6.2 |"
    assert lines[3] == "| sft |  | 0.550 / 0.540 |  | 0.500 / 0.499 | 6.2 |"
    assert "2,000 SST-2 training sentences drawn with seed 0" in markdown and "first 300 dev" in markdown
    assert metrics["head/pretrain/frozen/dev_accuracy"] == 0.6
    assert metrics["head/pretrain/lora/test_accuracy"] == pytest.approx(0.605)
    assert metrics["head/pretrain/prompting/dev_accuracy"] == 0.512
    assert metrics["head/sft/majority/test_accuracy"] == 0.499
    assert "head/sft/lora/dev_accuracy" not in metrics and "head/sft/prompting/dev_accuracy" not in metrics
