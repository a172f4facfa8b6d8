"""Decoding with the KV cache: greedy, sampling (temperature, top-k, top-p) and beam search.

The prompt is run once (prefill), then each step feeds only the newest token and reuses the cached keys
and values. The model has a fixed context: once prompt + generated tokens no longer fit, decoding keeps the
last ``context`` tokens, drops the cache and re-runs that window. The cache cannot simply be trimmed,
because its keys carry their positions (learned position embeddings or RoPE) and would all have to shift
by one. So past the context every step costs a full window, like decoding without a cache, and the
logits are exactly those the model gives for the last ``context`` tokens.

    python -m pipeline.model.generate outputs/demo/pretrain --prompt "ROMEO:" --strategy sample --top-p 0.9
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from pipeline.errors import BadInput, MissingUpstream, PipelineError
from pipeline.model.checkpoints import checkpoint_dir_for, latest_checkpoint
from pipeline.model.gpt import GPT, MODEL_FILE, KVCache
from pipeline.model.spec import STRATEGIES, DecodeSpec
from pipeline.model.io import load_pretrained, model_kind, tokenizer_candidates

def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits`` (..., vocab) with all but the ``k`` largest of each row set to -inf; k=0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``logits`` (..., vocab) keeping the nucleus: the most likely tokens until their probability reaches ``p``.

    A token stays if the tokens more likely than it sum to less than ``p``, so the most likely one always stays.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _next_logits(model: GPT, seqs: torch.Tensor, cache: Optional[KVCache]) -> tuple[torch.Tensor, KVCache]:
    """Float logits (batch, vocab) for the token after each row of ``seqs`` (batch, time).

    ``cache`` holds every token of ``seqs`` but the last, or is None before the first step.
    """
    window = model.cfg.context
    if cache is not None and seqs.shape[1] <= window:
        logits, cache = model(seqs[:, -1:], past=cache, use_cache=True)
    else:  # the prefill, or past the context: re-run the last `window` tokens (see the module docstring)
        logits, cache = model(seqs[:, -window:], use_cache=True)
    return logits[:, -1].float(), cache


def _as_prompt(prompt_ids: Union[Sequence[int], torch.Tensor], device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).flatten()
    if ids.numel() == 0:
        raise BadInput("the prompt is empty: decoding needs at least one token to condition on")
    return ids[None]


def _greedy_or_sample(model: GPT, prompt: torch.Tensor, spec: DecodeSpec, eos_id: Optional[int]) -> list[int]:
    generator = None
    if spec.strategy == "sample":
        generator = torch.Generator(device=prompt.device).manual_seed(spec.seed)
    seqs, cache, new = prompt, None, []
    for _ in range(spec.max_new_tokens):
        logits, cache = _next_logits(model, seqs, cache)
        if generator is None:
            token = logits.argmax(dim=-1)
        else:
            logits = top_p_filter(top_k_filter(logits / spec.temperature, spec.top_k), spec.top_p)
            token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
        new.append(int(token))
        if new[-1] == eos_id:
            break
        seqs = torch.cat([seqs, token[:, None]], dim=1)
    return new


def _beam_search(model: GPT, prompt: torch.Tensor, spec: DecodeSpec, eos_id: Optional[int]) -> list[int]:
    """Best hypothesis by logprob / length ** length_penalty (length counts generated tokens, eos included).

    Search stops once ``num_beams`` hypotheses have finished at eos and no live beam scores above the
    worst of them at its current length (exact for length_penalty <= 0, where scores only fall as
    hypotheses grow; a heuristic above 0, as in transformers' default).
    """
    width = spec.num_beams

    def score(logprob: float, length: int) -> float:
        return logprob / length ** spec.length_penalty

    seqs, cache = prompt, None
    beam_logprobs = torch.zeros(1, device=prompt.device)  # one beam until the first step fans out
    finished: list[tuple[float, list[int]]] = []  # (score, generated tokens), best first, at most `width`
    n_prompt = prompt.shape[1]
    for step in range(1, spec.max_new_tokens + 1):
        logits, cache = _next_logits(model, seqs, cache)
        candidates = (beam_logprobs[:, None] + F.log_softmax(logits, dim=-1)).flatten()
        # 2 * width candidates leave `width` live ones even if up to `width` of them end at eos.
        top_logprobs, top = candidates.topk(min(2 * width, candidates.numel()))
        vocab = logits.shape[-1]
        keep_beams, keep_tokens, keep_logprobs = [], [], []
        for logprob, flat in zip(top_logprobs.tolist(), top.tolist()):
            beam, token = divmod(flat, vocab)
            if token == eos_id:
                generated = seqs[beam, n_prompt:].tolist() + [token]
                finished.append((score(logprob, step), generated))
            else:
                keep_beams.append(beam)
                keep_tokens.append(token)
                keep_logprobs.append(logprob)
            if len(keep_beams) == width:
                break
        assert keep_beams, f"no live beam among {top.numel()} candidates (vocab {vocab}, {width} beams)"
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:width]
        index = torch.tensor(keep_beams, device=prompt.device)
        seqs = torch.cat([seqs[index], torch.tensor(keep_tokens, device=prompt.device)[:, None]], dim=1)
        cache = [(k[index], v[index]) for k, v in cache]
        beam_logprobs = torch.tensor(keep_logprobs, device=prompt.device)
        if len(finished) == width and score(keep_logprobs[0], step) <= finished[-1][0]:
            break
    # Hypotheses still live at the end compete with the finished ones on the same score.
    length = seqs.shape[1] - n_prompt
    live = [(score(lp, length), seqs[b, n_prompt:].tolist()) for b, lp in enumerate(beam_logprobs.tolist())]
    return max(finished + live, key=lambda f: f[0])[1]


@torch.no_grad()
def generate(model: GPT, prompt_ids: Union[Sequence[int], torch.Tensor], spec: DecodeSpec,
             eos_id: Optional[int] = None) -> list[int]:
    """The new tokens after ``prompt_ids`` (eos included when generation stopped at it).

    Dropout is whatever mode the model is in: call ``model.eval()`` first.
    """
    prompt = _as_prompt(prompt_ids, next(model.parameters()).device)
    if spec.max_new_tokens == 0:
        return []
    if spec.strategy == "beam":
        return _beam_search(model, prompt, spec, eos_id)
    return _greedy_or_sample(model, prompt, spec, eos_id)


def generate_text(model: GPT, tokenizer, prompt: str, spec: DecodeSpec, eos_id: Optional[int] = None) -> str:
    """The continuation of ``prompt`` as text (a ``tokenizers.Tokenizer``; a final eos is not shown).

    An empty prompt starts from ``eos_id``: the token shards put eos between documents, so it reads as
    "a new document begins".
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids and eos_id is not None:
        ids = [eos_id]
    new = generate(model, ids, spec, eos_id=eos_id)
    if new and new[-1] == eos_id:
        new = new[:-1]
    return tokenizer.decode(new, skip_special_tokens=False)


def newest_weights(stage_dir: Path) -> Path:
    """The stage directory, or the newest checkpoint of a run of it in progress or interrupted if that is newer."""
    newest = latest_checkpoint(checkpoint_dir_for(stage_dir))
    published = stage_dir / MODEL_FILE
    if newest is not None and (not published.is_file() or newest.stat().st_mtime > published.stat().st_mtime):
        print(f"using {newest} (a run in progress or interrupted)", file=sys.stderr)
        return newest
    return stage_dir


def load_for_generation(path: Path, tokenizer_path: Optional[str] = None):
    """(model, tokenizer) from what ``load_pretrained`` reads, preferring a newer checkpoint of a stage directory."""
    from tokenizers import Tokenizer

    checkpoint = path.suffix in (".ckpt", ".pt")
    path = path if checkpoint else newest_weights(path)
    if model_kind(path) is None:  # a missing directory is taken as a stage's, so the error names its model.pt
        raise MissingUpstream(f"{path if checkpoint else path / MODEL_FILE} is missing: run 'make pretrain' first")
    candidates = [Path(tokenizer_path)] if tokenizer_path is not None else tokenizer_candidates(path)
    tokenizer_json = next((c for c in candidates if c.is_file()), None)
    if tokenizer_json is None:
        raise MissingUpstream(f"{' or '.join(map(str, candidates))} is missing: pass --tokenizer <tokenizer.json>")
    model = load_pretrained(path, "path", tokenizer_json).model
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    if tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise BadInput(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but {path} only "
                       f"{model.cfg.vocab_size}: pass the tokenizer it was trained with (--tokenizer)")
    return model, tokenizer


def main(argv: Optional[list[str]] = None) -> int:
    defaults = DecodeSpec()
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.model.generate",
        description="Continue a prompt with a trained model (KV-cached decoding) and print prompt + continuation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("path", type=Path,
                        help="a stage directory (model.pt, or an sft adapter), a .ckpt or .pt file, or a "
                             "transformers directory, with tokenizer.json beside it")
    parser.add_argument("--prompt", default="",
                        help="text to continue; empty starts a new document (after the eos token)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json to use (default: beside the model, or in a .ckpt's parent directory)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy,
                        help="how the next token is chosen")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="stop after this many tokens (or at --eos-token)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="sample only")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="sample only; 0 = off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="sample only; 1.0 = off")
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams, help="beam only")
    parser.add_argument("--length-penalty", type=float, default=defaults.length_penalty,
                        help="beam only: score = logprob / length ** length_penalty")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="sample only")
    parser.add_argument("--eos-token", default="</s>",
                        help="stop when the model produces this token ('' never stops early)")
    parser.add_argument("--chat", default=None, metavar="TEMPLATE",
                        help="ask a fine-tuned model: the prompt becomes a user turn in this chat template "
                             "(chatml, llama2; 'auto' reads chat_template.jinja's name from the manifest) and "
                             "generation stops at the template's end-of-turn token")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args(argv)

    try:
        spec = DecodeSpec(strategy=args.strategy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                          length_penalty=args.length_penalty, seed=args.seed)
        model, tokenizer = load_for_generation(args.path, args.tokenizer)
        eos_id = tokenizer.token_to_id(args.eos_token) if args.eos_token else None
        if args.eos_token and eos_id is None:
            raise BadInput(f"--eos-token {args.eos_token!r} is not in the tokenizer; pass one it has, or ''")
        model.to(args.device).eval()
        if args.chat:
            print(chat_reply(model, tokenizer, args.path, args.prompt, args.chat, spec, args.eos_token))
            return 0
        text = generate_text(model, tokenizer, args.prompt, spec, eos_id=eos_id)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


def chat_reply(model: GPT, tokenizer, path: Path, prompt: str, template: str, spec: DecodeSpec, eos: str) -> str:
    """The model's reply to ``prompt`` as a user turn of ``template`` ('auto': the one the stage recorded)."""
    import json

    from pipeline.sft.chat import encode_prompt, get_template

    if template == "auto":
        manifest = path / "manifest.json" if path.is_dir() else path.parent / "manifest.json"
        recorded = json.loads(manifest.read_text())["outputs"].get("template") if manifest.is_file() else None
        if recorded is None:
            raise BadInput(f"{path} records no chat template (not an sft or merge output): pass --chat chatml|llama2")
        template = recorded
    chat = get_template(template)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": prompt}], chat, "<s>", eos)
    end_id = tokenizer.token_to_id(chat.end_of_turn or eos)
    new = generate(model, ids, spec, eos_id=end_id)
    return tokenizer.decode(new[:-1] if new and new[-1] == end_id else new, skip_special_tokens=True).strip()


if __name__ == "__main__":
    sys.exit(main())
