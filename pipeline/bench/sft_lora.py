"""LoRA against full fine-tuning of the same model: trainable parameters, peak memory, tokens/s.

Both arms fine-tune the same model (conf/model/, medium here, tiny in --quick; identical initial
weights) on the same micro-batches of real instruction data (CodeAlpaca, written with the sft
stage's chat template and masked to the replies) through the sft stage's Lightning path
(``SFTModule``, ``SFTData``), with the same optimizer settings (``sft.optim``), gradient clipping and
number of steps. The full arm trains every weight; the LoRA arm adds the adapters of ``sft.lora``
(rank 8 on attn.qkv and attn.proj) and trains only those. A third arm, LoRA on packed rows
(``sft.packing``), shows what packing adds; its micro-batch holds as many rows as carry about the
real tokens of a padded micro-batch, so both move similar work per step.

Tokens are real tokens (not padding), so the packed arm is scored on the same footing; the two
padded arms see the same batches, so their ratio is the same whichever way tokens are counted.
Each arm runs some untimed steps first; the clock covers the next ones (``StepTimer``, data fetch
included). Arms alternate within a round, the order reversed every other round, and the median
round is reported.

Peak memory. Every arm runs in a child process of its own, forked from multiprocessing's fork
server: a process that has imported the libraries and computed nothing, so no arm inherits another's
memory. (A fresh ``python -m`` would spend ~10 s per arm importing; a fork of this process would hang
in torch's OpenMP pool once anything has computed here, as ``make bench``'s earlier benchmarks do.)
On CUDA the child reads ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, just
before the model is built. On CPU there is no allocator counter: the child resets the kernel's peak
resident set (``/proc/self/clear_refs``, "5") and reads its resident set (``/proc/self/statm``) just
before the model is built; the peak (``ru_maxrss``) after training, minus that, is the memory the
model, its gradients, the optimizer state and the activations took at most. Where the reset is
refused, ru_maxrss is the peak since the fork; the result says which method was used.

Trainable fraction: counted for every shape in conf/model/ (built on the meta device, so nothing
is allocated); the goal applies to the larger sizes (``LARGE_SIZES``).
"""
from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import resource
import statistics
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from pipeline import PROJECT_ROOT
from pipeline.bench.pretrain_step import StepTimer, bench_trainer, quiet_lightning, sigterm_fails, tokenize_dir
from pipeline.config import RootConfig, SftConfig, compose
from pipeline.errors import BadInput
from pipeline.model.gpt import GPT, ModelConfig
from pipeline.sft.batching import pack
from pipeline.sft.chat import Encoded, add_chat_tokens, encode_all
from pipeline.sft.data import read_source
from pipeline.sft.lora import LoraSpec, add_lora, trainable_fraction
from pipeline.sft.train import SFTData, SFTModule
from pipeline.tokenizer.build import vocab_bound
from pipeline.sft.lora import chat_lora
from pipeline.tokenizer.build import byte_tokenizer
from pipeline.train.run import TrainerSpec, precision_for

SPEED_GOAL = 1.0  # LoRA tokens/s over full fine-tuning's: at least as fast
MEMORY_GOAL = 0.6  # LoRA peak memory over full fine-tuning's: at most
TRAINABLE_GOAL = 0.01  # trainable share of the parameters at rank 8, on the larger sizes: at most
LARGE_SIZES = ("medium", "gpt1")
SOURCE = ("alpaca", "instruct/codealpaca/code_alpaca_2k.json", "codealpaca")  # format, path under data_dir, name
# The bench's own defaults, before the caller's overrides: a model whose weights and optimizer state
# weigh against the activations, and a micro-batch that keeps the run to minutes on 2 CPU cores.
DEFAULTS = ["model=medium", "sft.micro_batch_size=4"]
QUICK = ["model=tiny", "model.context=256", "sft.micro_batch_size=4", "sft.drop_truncated=false"]


class LossTimer(StepTimer):
    """StepTimer, plus the loss of the first batch: taken before any update, so every arm must agree on it."""

    first_loss: Optional[float] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx == 0:
            self.first_loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)


@dataclass
class Setup:
    """What every arm shares: the config, the encoded examples and the model shape."""

    cfg: RootConfig
    sft: SftConfig
    trainer: TrainerSpec
    model: ModelConfig
    examples: list[Encoded]
    pad_id: int
    tokenizer: str  # where it came from
    lora: LoraSpec  # the sft stage's, chat-marker rows included
    counts: dict
    untimed: int
    steps: int
    rounds: int


def bench_tokenizer(cfg) -> tuple[Tokenizer, str]:
    """The demo's tokenizer when the tokenize stage has run, else 256 bytes plus the special tokens."""
    path = tokenize_dir(cfg) / "tokenizer.json"
    specials = cfg.tokenizer.special_tokens.all()
    if path.is_file():
        return Tokenizer.from_file(str(path)), str(path)
    return byte_tokenizer(specials), f"bytes (no {path})"


def setup(quick: bool, overrides: list[str]) -> Setup:
    cfg = compose(*(QUICK if quick else DEFAULTS), *overrides)
    sft = cfg.sft
    tokenizer, tokenizer_name = bench_tokenizer(cfg)
    add_chat_tokens(tokenizer, sft.template)
    special = cfg.tokenizer.special_tokens
    pad_id = tokenizer.token_to_id(special.pad)
    if pad_id is None:
        raise BadInput(f"{tokenizer_name} has no pad token {special.pad!r} (tokenizer.special_tokens.pad)")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_bound(tokenizer))
    max_tokens = min(sft.max_tokens or model_cfg.context, model_cfg.context)  # as the sft stage cuts them
    fmt, path, name = SOURCE
    read = read_source(fmt, str(Path(cfg.paths.data_dir) / path), name)
    examples, counts = encode_all(read.conversations, tokenizer, sft.template, max_tokens, special.bos, special.eos,
                                  sft.drop_truncated)
    untimed, steps, rounds = (1, 4, 2) if quick else (1, 4, 3)
    return Setup(cfg, sft, cfg.trainer, model_cfg, examples, pad_id,
                 tokenizer_name, chat_lora(sft.lora, sft.template, tokenizer, sft.lora.chat_tokens), counts, untimed,
                 steps, rounds)


def trainable_by_size(s: Setup) -> dict[str, dict]:
    """Trainable parameters with the LoRA of ``sft.lora`` for every shape in conf/model/, smallest first."""
    sizes = {}
    for path in sorted((PROJECT_ROOT / "conf" / "model").glob("*.yaml")):
        shape = dataclasses.replace(ModelConfig(**OmegaConf.to_container(OmegaConf.load(path))),
                                    vocab_size=s.model.vocab_size)
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
            trainable, total, fraction = trainable_fraction(add_lora(GPT(shape), s.lora))
        sizes[path.stem] = {"trainable": trainable, "total": total, "fraction": round(fraction, 5)}
    return dict(sorted(sizes.items(), key=lambda item: item[1]["total"]))


def packed_micro_batch(s: Setup) -> int:
    """Packed rows per micro-batch carrying about the real tokens of a padded micro-batch."""
    rows = pack(s.examples, s.model.context)
    tokens_per_row = sum(len(e.ids) for e in s.examples) / len(rows)
    tokens_per_example = sum(len(e.ids) for e in s.examples) / len(s.examples)
    return max(1, round(s.sft.micro_batch_size * tokens_per_example / tokens_per_row))


ARMS = {"full": "full fine-tuning (every weight trains)", "lora": "LoRA (adapters train, base frozen)",
        "lora_packed": "LoRA on packed rows"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def train_arm(s: Setup, arm: str) -> dict:
    """Fine-tune one arm in this process; its step times, losses and peak memory."""
    max_steps = s.untimed + s.steps
    packed = arm == "lora_packed"
    micro = packed_micro_batch(s) if packed else s.sft.micro_batch_size
    data = SFTData(s.examples, {}, micro, 1, s.cfg.seed, s.pad_id, s.model.context if packed else None)
    batches = [data.batches[k]["input_ids"] for k in range(s.untimed, max_steps)]
    real = [int((b != s.pad_id).sum()) for b in batches]
    slots = [b.numel() for b in batches]
    cuda = s.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()

    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before, method = torch.cuda.memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        reset = _reset_peak_rss()
        before = _rss_bytes()
        method = "peak RSS (reset by /proc/self/clear_refs) above RSS before the model" if reset else \
            "peak RSS since the fork (ru_maxrss; /proc/self/clear_refs refused) above RSS before the model"
    torch.manual_seed(s.cfg.seed)
    model = GPT(s.model)
    if arm != "full":
        model = add_lora(model, s.lora)
    trainable, total, fraction = trainable_fraction(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    module = SFTModule(model, s.sft.optim, max_steps, adapters_only=arm != "full")
    timer = LossTimer(first=s.untimed, last=max_steps - 1)
    trainer = bench_trainer(s.trainer, max_steps, s.sft.grad_clip, [timer])
    with sigterm_fails("sft_lora"):
        trainer.fit(module, datamodule=data)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # Linux: kilobytes
    return {"step_seconds": timer.step_seconds, "real_tokens": real, "slots": slots, "steps": trainer.global_step,
            "micro_batch": micro, "first_loss": timer.first_loss, "final_loss": timer.final_loss,
            "peak_bytes": peak, "memory_method": method, "trainable": trainable, "total": total,
            "fraction": fraction, "weights_bytes": weights, "device": "cuda" if cuda else "cpu",
            "precision": precision_for(s.trainer), "torch_threads": torch.get_num_threads()}


def _child(s: Setup, arm: str, conn) -> None:
    quiet_lightning()
    try:
        conn.send(("ok", train_arm(s, arm)))
    except BaseException as e:  # SystemExit from sigterm_fails included: the parent reports it
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def forked_arm(s: Setup, arm: str) -> dict:
    """``train_arm`` in a child of the fork server: its peak memory is its own, and nothing of it stays here."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "peft"])  # imported once, by the server, before its first fork
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(s, arm, send))
    child.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:  # died without a word: killed (out of memory?)
        status, value = "error", "the child process ended without a result"
    child.join()
    if status != "ok":
        raise RuntimeError(f"sft_lora: arm {arm} failed (exit code {child.exitcode}): {value}")
    return value


def summary(s: Setup, runs: list[dict]) -> dict:
    per_run = [sum(r["real_tokens"]) / sum(r["step_seconds"]) for r in runs]
    peaks = [r["peak_bytes"] / 2**20 for r in runs]
    first = runs[0]
    assert all(r["steps"] == first["steps"] == s.untimed + s.steps for r in runs), [r["steps"] for r in runs]
    return {"tokens_per_s": round(statistics.median(per_run), 1), "runs": [round(x, 1) for x in per_run],
            "peak_memory_mb": round(statistics.median(peaks), 1), "peak_memory_runs_mb": [round(x, 1) for x in peaks],
            "trainable_params": first["trainable"], "total_params": first["total"],
            "trainable_fraction": round(first["fraction"], 5), "micro_batch": first["micro_batch"],
            "steps": first["steps"], "timed_steps": len(first["step_seconds"]),
            # real tokens over the slots computed (padding included): how much of the work is useful
            "fill": round(sum(first["real_tokens"]) / sum(first["slots"]), 3),
            "initial_loss": round(first["first_loss"], 6), "final_loss": round(statistics.median(
                r["final_loss"] for r in runs), 5)}


def run(quick: bool = False, overrides: list[str] = ()) -> dict:
    quiet_lightning()
    s = setup(quick, list(overrides))
    sizes = trainable_by_size(s)
    load = [os.getloadavg()[0]]  # other processes on the machine slow every arm; say how busy it was
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(s.rounds):  # interleaved, the order reversed every other round, so drift hits every arm alike
        for arm in (list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]):
            runs[arm].append(forked_arm(s, arm))
    load.append(os.getloadavg()[0])
    full, lora, packed = (summary(s, runs[arm]) for arm in ARMS)
    ratio = lora["tokens_per_s"] / full["tokens_per_s"]
    memory_ratio = lora["peak_memory_mb"] / full["peak_memory_mb"]
    large = {name: sizes[name]["fraction"] for name in LARGE_SIZES if name in sizes}
    meets_trainable = bool(large) and all(f <= TRAINABLE_GOAL for f in large.values())
    packing_ratio = packed["tokens_per_s"] / lora["tokens_per_s"]
    one = runs["full"][0]
    weights_mb = one["weights_bytes"] / 2**20
    return {
        "name": "sft_lora",
        "what": "fine-tuning the same model with LoRA adapters vs every weight: tokens/s, peak memory, trainable "
                "parameters; same initial weights, batches, optimizer and steps",
        "data": f"{SOURCE[2]} ({SOURCE[1]}): {s.counts['kept']} conversations, {s.counts['tokens']} tokens, "
                f"template {s.sft.template}",
        "tokenizer": s.tokenizer,
        "model": {k: getattr(s.model, k) for k in ("block", "n_layer", "n_head", "d_model", "d_ff", "context",
                                                    "vocab_size")},
        "lora": dataclasses.asdict(s.lora),
        "micro_batch": s.sft.micro_batch_size, "untimed_steps": s.untimed, "timed_steps": s.steps,
        "rounds": s.rounds, "device": one["device"], "precision": one["precision"],
        "torch_threads": one["torch_threads"], "load_average_1min": [round(x, 2) for x in load],
        "weights_mb": round(weights_mb, 1), "tokens": "real (non-pad) tokens", "peak_memory": one["memory_method"],
        "baseline": {"name": ARMS["full"], **full},
        "candidate": {"name": ARMS["lora"], **lora},
        "packing": {"name": ARMS["lora_packed"], **packed, "ratio_to_padded_lora": round(packing_ratio, 3)},
        "trainable_by_size": sizes,
        "memory_ratio": round(memory_ratio, 3), "memory_goal": MEMORY_GOAL,
        "meets_memory_goal": memory_ratio <= MEMORY_GOAL,
        "trainable_goal": TRAINABLE_GOAL, "meets_trainable_goal": meets_trainable,
        "note": f"peak memory LoRA/full {memory_ratio:.3f}, {lora['peak_memory_mb']:.0f}/{full['peak_memory_mb']:.0f}"
                f" MB, weights {weights_mb:.0f} MB (goal <= {MEMORY_GOAL}: "
                f"{'ok' if memory_ratio <= MEMORY_GOAL else 'NOT MET'}); trainable at rank {s.sft.lora.rank}: "
                + ", ".join(f"{n} {v['fraction']:.2%}" for n, v in sizes.items())
                + f" (goal <= {TRAINABLE_GOAL:.0%} on {'/'.join(LARGE_SIZES)}: "
                f"{'ok' if meets_trainable else 'NOT MET'}); packed rows {packing_ratio:.2f}x padded LoRA's "
                f"real tokens/s (fill {packed['fill']:.2f} vs {lora['fill']:.2f}); initial loss full "
                f"{full['initial_loss']:.5f}, LoRA {lora['initial_loss']:.5f}",
        "overrides": list(overrides),
        "ratio": round(ratio, 3),
        "goal": SPEED_GOAL,
        "meets_goal": ratio >= SPEED_GOAL,
    }
