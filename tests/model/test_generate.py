"""Decoding: the KV cache changes nothing but speed; each strategy does what its name promises."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import BadInput
from pipeline.model.generate import DecodeSpec, generate, generate_text, main, top_k_filter, top_p_filter
from pipeline.model.gpt import save_model
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer
from tests.model.conftest import random_model

PROMPT = [5, 17, 42, 8, 99]


@torch.no_grad()
def argmax_without_cache(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: the whole (cropped) sequence through the model every step."""
    tokens = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([tokens[-model.cfg.context:]]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


@torch.no_grad()
def sequence_logprob(model, prompt: list[int], new: list[int]) -> float:
    tokens = torch.tensor([prompt + new])
    logits, _ = model(tokens[:, :-1])
    logprobs = logits.log_softmax(dim=-1)[0, len(prompt) - 1:]
    return float(logprobs.gather(-1, torch.tensor(new)[:, None]).sum())


@torch.no_grad()
def test_cached_logits_match_uncached(block):
    model = random_model(block)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12))
    full, _ = model(tokens)
    prefill, cache = model(tokens[:, :5], use_cache=True)
    torch.testing.assert_close(prefill, full[:, :5], atol=1e-5, rtol=0)
    for t in range(5, 12):
        step, cache = model(tokens[:, t:t + 1], past=cache, use_cache=True)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=0)
    assert cache[0][0].shape == (2, model.cfg.n_head, 12, model.cfg.head_dim)


def test_greedy_is_stepwise_argmax(block):
    model = random_model(block)
    new = generate(model, PROMPT, DecodeSpec(strategy="greedy", max_new_tokens=10))
    assert new == argmax_without_cache(model, PROMPT, 10)
    assert len(set(new)) > 1, "a degenerate model would make this test vacuous"


def test_sampling_with_top_k_1_is_greedy(block):
    model = random_model(block)
    spec = DecodeSpec(strategy="sample", max_new_tokens=10, top_k=1, temperature=1.5, seed=3)
    assert generate(model, PROMPT, spec) == generate(model, PROMPT, DecodeSpec(max_new_tokens=10))


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.125, 0.5, 0.05, 0.25, 0.075])  # shuffled, so the sort is exercised
    logits = probs.log()  # sorted cumulative: 0.5, 0.75, 0.875, 0.95, 1.0
    for p, nucleus in [(0.3, {1}), (0.6, {1, 3}), (0.8, {1, 3, 0}), (0.9, {1, 3, 0, 4}),
                       (0.97, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})]:
        kept = top_p_filter(logits, p).isfinite().nonzero().flatten().tolist()
        assert set(kept) == nucleus, f"top_p={p}"
    # Rows are filtered independently.
    batch = torch.stack([logits, logits.flip(0)])
    kept = top_p_filter(batch, 0.7).isfinite()
    assert kept[0].nonzero().flatten().tolist() == [1, 3]
    assert kept[1].nonzero().flatten().tolist() == [1, 3]


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5]])
    assert top_k_filter(logits, 2).isfinite().nonzero()[:, 1].tolist() == [1, 3]
    assert top_k_filter(logits, 0).isfinite().all()


def test_sampling_is_reproducible_by_seed(block):
    model = random_model(block)
    spec = lambda seed: DecodeSpec(strategy="sample", max_new_tokens=20, temperature=2.0, seed=seed)  # noqa: E731
    assert generate(model, PROMPT, spec(1)) == generate(model, PROMPT, spec(1))
    assert generate(model, PROMPT, spec(1)) != generate(model, PROMPT, spec(2))


def test_sampling_only_draws_from_the_nucleus(block):
    model = random_model(block)
    logits, _ = model(torch.tensor([PROMPT]))
    nucleus = top_p_filter(logits[0, -1], 0.5).isfinite().nonzero().flatten().tolist()
    assert 1 < len(nucleus) < model.cfg.vocab_size // 2
    firsts = {generate(model, PROMPT, DecodeSpec(strategy="sample", max_new_tokens=1, top_p=0.5, seed=s))[0]
              for s in range(40)}
    assert firsts <= set(nucleus) and len(firsts) > 1


def test_beam_of_one_is_greedy(block):
    model = random_model(block)
    beam = generate(model, PROMPT, DecodeSpec(strategy="beam", num_beams=1, max_new_tokens=10))
    assert beam == generate(model, PROMPT, DecodeSpec(max_new_tokens=10))


def test_beam_search_finds_a_likelier_sequence_than_greedy(block):
    model = random_model(block, scale=0.5)  # a peakier model, where greedy choices have consequences
    n = 8
    greedy = generate(model, PROMPT, DecodeSpec(max_new_tokens=n))
    beam = generate(model, PROMPT, DecodeSpec(strategy="beam", num_beams=4, length_penalty=0.0, max_new_tokens=n))
    assert len(beam) == n
    assert sequence_logprob(model, PROMPT, beam) >= sequence_logprob(model, PROMPT, greedy) - 1e-5


def first_new_token_position(seq: list[int]) -> int:
    return next(i for i in range(1, len(seq)) if seq[i] not in seq[:i])


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_eos_stops_generation(block, strategy):
    model = random_model(block)
    spec = DecodeSpec(strategy=strategy, max_new_tokens=12, temperature=2.0, seed=7)
    free = generate(model, PROMPT, spec)
    i = first_new_token_position(free)
    assert generate(model, PROMPT, spec, eos_id=free[i]) == free[:i + 1]


def test_beam_hypotheses_end_at_eos(block):
    model = random_model(block)
    free = generate(model, PROMPT, DecodeSpec(max_new_tokens=12))
    eos = free[first_new_token_position(free)]
    for num_beams in (1, 3):
        beam = generate(model, PROMPT, DecodeSpec(strategy="beam", num_beams=num_beams, max_new_tokens=12), eos_id=eos)
        assert eos not in beam[:-1]
    # Greedy reaches eos, so a single beam must stop there too.
    beam = generate(model, PROMPT, DecodeSpec(strategy="beam", num_beams=1, length_penalty=0.0, max_new_tokens=12),
                    eos_id=eos)
    assert beam == free[:first_new_token_position(free) + 1]


def test_generation_runs_past_the_context(block):
    model = random_model(block, context=8)
    n = 3 * model.cfg.context
    assert generate(model, PROMPT, DecodeSpec(max_new_tokens=n)) == argmax_without_cache(model, PROMPT, n)
    long_prompt = list(range(1, 20))  # itself longer than the context
    assert generate(model, long_prompt, DecodeSpec(max_new_tokens=5)) == argmax_without_cache(model, long_prompt, 5)
    beam = generate(model, PROMPT, DecodeSpec(strategy="beam", num_beams=3, max_new_tokens=n))
    assert len(beam) == n
    sample = generate(model, PROMPT, DecodeSpec(strategy="sample", max_new_tokens=n, seed=0))
    assert len(sample) == n


def test_bad_specs_are_user_errors():
    for bad in [dict(strategy="nucleus"), dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1),
                dict(num_beams=0), dict(max_new_tokens=-1)]:
        with pytest.raises(BadInput, match=next(iter(bad))):
            DecodeSpec(**bad)
    with pytest.raises(BadInput, match="empty"):
        generate(random_model("gpt"), [], DecodeSpec())


def test_generate_text_returns_the_continuation_only():
    model = random_model("gpt")
    tokenizer = byte_tokenizer(SpecialTokens().all())
    spec = DecodeSpec(max_new_tokens=6)
    text = generate_text(model, tokenizer, "Hi", spec)
    assert text == tokenizer.decode(generate(model, tokenizer.encode("Hi").ids, spec))
    eos_id = tokenizer.token_to_id("</s>")
    assert generate_text(model, tokenizer, "", spec, eos_id=eos_id) == \
        tokenizer.decode(generate(model, [eos_id], spec, eos_id=eos_id))


@pytest.fixture
def stage_dir(tmp_path):
    directory = tmp_path / "pretrain"
    directory.mkdir()
    model = random_model("llama")
    save_model(model, directory / "model.pt")
    byte_tokenizer(SpecialTokens().all()).save(str(directory / "tokenizer.json"))
    return directory, model


def test_cli_prints_prompt_and_continuation(stage_dir, capsys):
    directory, model = stage_dir
    tokenizer = byte_tokenizer(SpecialTokens().all())
    assert main([str(directory), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--eos-token", ""]) == 0
    expected = generate_text(model, tokenizer, "ROMEO:", DecodeSpec(max_new_tokens=5))
    assert capsys.readouterr().out == "ROMEO:" + expected + "\n"


def test_cli_reads_a_lightning_checkpoint(stage_dir, capsys):
    directory, model = stage_dir
    ckpt = directory / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"hyper_parameters": {"model": model.cfg.as_dict()},  # plain values, as LanguageModel saves them
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    assert main([str(ckpt), "--prompt", "a", "--strategy", "beam", "--num-beams", "2", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("a")


def test_cli_missing_model_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and "make pretrain" in err and "Traceback" not in err


def test_cli_bad_option_is_one_line(stage_dir, capsys):
    directory, _ = stage_dir
    assert main([str(directory), "--top-p", "1.5"]) == 2
    assert "top_p=1.5" in capsys.readouterr().err


def test_cli_chat_asks_in_the_recorded_template_and_stops_at_its_end_of_turn(stage_dir, capsys):
    import json

    from pipeline.sft.chat import encode_prompt

    directory, model = stage_dir
    tokenizer = byte_tokenizer(SpecialTokens().all())
    assert main([str(directory), "--prompt", "Hi", "--chat", "auto"]) == 2  # a pretrain output has no template
    assert "records no chat template" in capsys.readouterr().err
    (directory / "manifest.json").write_text(json.dumps({"outputs": {"template": "chatml"}}))
    for template in ("auto", "llama2"):
        assert main([str(directory), "--prompt", "Hi", "--chat", template, "--max-new-tokens", "6"]) == 0
        chat = "chatml" if template == "auto" else template
        ids = encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}], chat, "<s>", "</s>")
        end = tokenizer.token_to_id("<|im_end|>" if chat == "chatml" else "</s>")
        new = generate(model, ids, DecodeSpec(max_new_tokens=6), eos_id=end)
        expected = tokenizer.decode(new[:-1] if new and new[-1] == end else new, skip_special_tokens=True).strip()
        assert capsys.readouterr().out == expected + "\n"
