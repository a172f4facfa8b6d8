"""Prompting (in-context) evaluation: pick the answer the model finds most likely after a prompt.

Each example is rendered as a prompt (``k`` solved demonstrations, then the query's template) and
every candidate answer is scored as a continuation of it: the summed log-probability of the
answer's tokens, or their mean with ``length_normalize`` (which stops long answers losing only
for being long). The predicted label is the one whose candidate scores highest. Any causal LM
behind :class:`ScoredModel` works, since only log-likelihoods are needed.

Candidates come in two shapes:
    fixed     ``PromptTask.answers`` maps answer texts to labels, the same for every example
              (SST-2: " positive" / " negative"). Several texts may map to one label; a label's
              score is the best of its texts' scores (the model is credited with whichever
              wording of the label it prefers, and adding a synonym can only raise a label).
    per-example ``PromptTask.answers`` is None and each ``Example.choices`` holds the candidates;
              the label is the index of the right one (PIQA's sol1 / sol2).

Ties go to the lowest label id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.errors import BadInput
from pipeline.evaluate.models import ScoredModel


@dataclass
class Example:
    fields: dict[str, str]  # the template's input slots
    label: int
    choices: Optional[list[str]] = None  # per-example candidate answers; None when the task's are fixed


@dataclass(kw_only=True)
class PromptTask:
    name: str
    template: str  # str.format with named slots from Example.fields, e.g. "Review: {sentence}\nSentiment:"
    labels: list[str]  # label names, index = label id (the confusion matrix's rows and columns)
    answers: Optional[dict[str, int]] = None  # fixed answer text -> label; None: each example's choices
    answer_template: str = " {answer}"  # the continuation that is scored
    shots: int = 0  # solved demonstrations before the query
    separator: str = "\n\n"  # between demonstrations, and before the query
    length_normalize: bool = False  # score = mean log-prob per answer token instead of the sum
    seed: int = 0  # demonstrations are drawn from numpy's Generator seeded with (seed, example index)

    def __post_init__(self):
        where = f"prompting task {self.name!r}"
        if not self.labels:
            raise BadInput(f"{where}: labels is empty; name every label (index = label id)")
        if self.shots < 0:
            raise BadInput(f"{where}: shots={self.shots} is negative")
        if self.answers is not None:
            if not self.answers:
                raise BadInput(f"{where}: answers is empty; give answer texts or None for per-example choices")
            bad = {a: y for a, y in self.answers.items() if not 0 <= y < len(self.labels)}
            if bad:
                raise BadInput(f"{where}: answers {bad} map to labels outside 0..{len(self.labels) - 1}")
        try:
            filled = self.answer_template.format(answer="\0")
        except (KeyError, IndexError, ValueError) as e:
            raise BadInput(f"{where}: answer_template {self.answer_template!r} is not a format string with only "
                           f"the slot {{answer}} ({e!r})") from e
        if "\0" not in filled:
            raise BadInput(f"{where}: answer_template {self.answer_template!r} has no {{answer}} slot")


@dataclass
class TaskResult:
    name: str
    shots: int
    accuracy: float
    confusion: list[list[int]]  # rows: true label, columns: predicted label
    n: int
    random_baseline: float  # expected accuracy of guessing uniformly among each example's candidate labels
    majority_baseline: float  # accuracy of always answering the most frequent training label
    predictions: list[tuple[int, int]]  # (label, predicted) per example
    labels: list[str] = field(default_factory=list)  # label names for the confusion table
    skipped: int = 0  # examples left out: a candidate answer alone is longer than the model's context
    scored: list[int] = field(default_factory=list)  # index of each scored example (predictions' order)
    loglikelihoods: list[list[float]] = field(default_factory=list)  # per scored example, each candidate's sum (nats)

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "random_baseline": self.random_baseline,
                "majority_baseline": self.majority_baseline, "n": self.n, "skipped": self.skipped}

    def confusion_table(self) -> str:
        names = self.labels or [str(i) for i in range(len(self.confusion))]
        rows = ["| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        rows += [f"| {name} | " + " | ".join(str(c) for c in row) + " |" for name, row in zip(names, self.confusion)]
        return "\n".join(rows)


# ---- readers ----------------------------------------------------------------------------------

def _lines(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _binary_label(text: str, where: str) -> int:
    if text.strip() not in ("0", "1"):
        raise BadInput(f"{where}: label {text!r} is not 0 or 1")
    return int(text)


def read_sst2(path: Path) -> list[Example]:
    """SST-2 as ``sentence<TAB>label`` lines (label 0 negative, 1 positive), no header."""
    out = []
    for number, line in enumerate(_lines(path), 1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise BadInput(f"{path}, line {number}: expected 'sentence<TAB>label', got {line[:60]!r}")
        if not parts[0].strip():
            raise BadInput(f"{path}, line {number}: the sentence is empty")
        out.append(Example({"sentence": parts[0]}, _binary_label(parts[1], f"{path}, line {number}")))
    return out


def read_piqa(jsonl_path: Path, labels_path: Path) -> list[Example]:
    """PIQA: ``{goal, sol1, sol2}`` per line, and the right solution's index (0/1) per line of ``labels_path``."""
    rows, labels = _lines(jsonl_path), _lines(labels_path)
    if len(rows) != len(labels):
        raise BadInput(f"{jsonl_path} has {len(rows)} lines but {labels_path} has {len(labels)}: "
                       f"they must be aligned line by line")
    out = []
    for number, (row, label) in enumerate(zip(rows, labels), 1):
        where = f"{jsonl_path}, line {number}"
        try:
            record = json.loads(row)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where}: not JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise BadInput(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in ("goal", "sol1", "sol2"):
            if not isinstance(record.get(key), str):
                raise BadInput(f"{where}: key {key!r} is missing or not a string")
        fields = {key: record[key] for key in ("goal", "sol1", "sol2")}
        out.append(Example(fields, _binary_label(label, f"{labels_path}, line {number}"),
                           choices=[fields["sol1"], fields["sol2"]]))
    return out


# ---- prompts ----------------------------------------------------------------------------------

def _fill(template: str, example: Example, where: str) -> str:
    try:
        return template.format(**example.fields)
    except KeyError as e:
        raise BadInput(f"{where}: the template needs field {e.args[0]!r}; the example has "
                       f"{sorted(example.fields)}") from e
    except (IndexError, ValueError) as e:
        raise BadInput(f"{where}: the template {template!r} is not a format string with named slots ({e})") from e


def answer_candidates(task: PromptTask, example: Example, where: str) -> list[tuple[str, int]]:
    """(answer text, label) pairs to score for ``example``."""
    if task.answers is not None:
        return list(task.answers.items())
    if not example.choices:
        raise BadInput(f"{where}: the task has no fixed answers and the example has no choices")
    if len(example.choices) > len(task.labels):
        raise BadInput(f"{where}: {len(example.choices)} choices but the task names only {len(task.labels)} labels")
    return [(choice, i) for i, choice in enumerate(example.choices)]


def _check_label(task: PromptTask, example: Example, where: str) -> None:
    possible = {label for _, label in answer_candidates(task, example, where)}
    if example.label not in possible:
        raise BadInput(f"{where}: label {example.label} is not among the candidates' labels {sorted(possible)}")


def correct_answer(task: PromptTask, example: Example, where: str = "") -> str:
    """The answer text a demonstration shows: the first answer text mapping to its label, or its right choice."""
    where = where or f"task {task.name!r}"
    _check_label(task, example, where)
    return next(text for text, label in answer_candidates(task, example, where) if label == example.label)


def build_prompt(task: PromptTask, example: Example, demonstrations: Sequence[Example]) -> str:
    """Solved demonstrations, then the query's template without an answer, joined by ``task.separator``."""
    where = f"task {task.name!r}"
    parts = [_fill(task.template, d, f"{where}, demonstration {i}")
             + task.answer_template.format(answer=correct_answer(task, d, f"{where}, demonstration {i}"))
             for i, d in enumerate(demonstrations)]
    return task.separator.join([*parts, _fill(task.template, example, f"{where}, query")])


def draw_demonstrations(task: PromptTask, examples: Sequence[Example], index: int,
                        train_examples: Optional[Sequence[Example]] = None) -> list[Example]:
    """``task.shots`` distinct demonstrations for ``examples[index]``: from ``train_examples``, or when None
    from the other examples (never the query). Seeded by (task.seed, index), so an example's prompt does
    not depend on which other examples are evaluated."""
    if task.shots == 0:
        return []
    pool_size = len(train_examples) if train_examples is not None else len(examples) - 1
    if task.shots > pool_size:
        source = "train_examples" if train_examples is not None else "the other examples"
        raise BadInput(f"task {task.name!r}: shots={task.shots} but {source} hold only {pool_size}")
    picks = np.random.default_rng([task.seed, index]).choice(pool_size, size=task.shots, replace=False)
    if train_examples is not None:
        return [train_examples[int(i)] for i in picks]
    return [examples[int(i) + (i >= index)] for i in picks]  # skip over the query


def render_prompts(task: PromptTask, examples: Sequence[Example], train_examples: Optional[Sequence[Example]] = None,
                   limit: Optional[int] = None) -> list[str]:
    """The prompt of each of the first ``limit`` examples, as :func:`evaluate_task` scores them."""
    n = len(examples) if limit is None else min(limit, len(examples))
    return [build_prompt(task, examples[i], draw_demonstrations(task, examples, i, train_examples)) for i in range(n)]


# ---- scoring ----------------------------------------------------------------------------------

@torch.no_grad()
def score_candidates(model: ScoredModel, prompts: Sequence[str], continuations: Sequence[Sequence[str]],
                     length_normalize: bool = False, batch_size: int = 16, device: str | torch.device = "cpu",
                     where: Optional[Sequence[str]] = None) -> list[list[float]]:
    """Log-likelihood (nats) of each continuation given its prompt: ``out[i][j]`` scores ``continuations[i][j]``
    after ``prompts[i]``; with ``length_normalize``, per continuation token. ``where[i]`` names prompt i
    in errors.

    Each sequence is ``prefix_id + prompt + continuation``; one longer than ``context + 1`` ids loses ids
    from its left (the prefix, then the prompt's start), as the later windows of perplexity.py do, so
    the continuation is always scored whole.
    """
    assert len(prompts) == len(continuations), (len(prompts), len(continuations))
    assert batch_size > 0, batch_size
    where = where or [f"prompt {i}" for i in range(len(prompts))]
    # Prompt and continuation are encoded separately and the ids concatenated: encoding the joined
    # text could merge tokens across the boundary, so the prompt's tokens (and so the conditioning)
    # would differ from one candidate to the next, and the continuation's tokens would be ill-defined.
    prompt_ids = model.encode(list(prompts))
    texts = sorted({c for cs in continuations for c in cs})
    encoded = dict(zip(texts, model.encode(texts)))

    sequences, owners = [], []  # one (ids, number of continuation ids) per (prompt, continuation)
    for i, (ids, cs) in enumerate(zip(prompt_ids, continuations)):
        for j, c in enumerate(cs):
            cont = encoded[c]
            if not cont:
                raise BadInput(f"{where[i]}: continuation {c!r} encodes to no tokens; nothing to score")
            if len(cont) > model.context:
                raise BadInput(f"{where[i]}: continuation {c[:40]!r} is {len(cont)} tokens, longer than the "
                               f"model's context of {model.context}")
            seq = [model.prefix_id, *ids, *cont][-(model.context + 1):]
            sequences.append((seq, len(cont)))
            owners.append((i, j))

    scores = [[0.0] * len(cs) for cs in continuations]
    # Longest first, so a batch holds sequences of similar length and the first batch shows whether memory suffices.
    order = sorted(range(len(sequences)), key=lambda k: len(sequences[k][0]), reverse=True)
    for start in range(0, len(order), batch_size):
        batch = [sequences[k] for k in order[start:start + batch_size]]
        width = len(batch[0][0]) - 1  # the model reads ids[:-1] and predicts ids[1:]
        inputs = torch.full((len(batch), width), model.prefix_id, dtype=torch.long)  # right padding, never scored
        targets = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (seq, n_cont) in enumerate(batch):
            ids = torch.tensor(seq, dtype=torch.long)
            inputs[row, :len(seq) - 1] = ids[:-1]
            targets[row, :len(seq) - 1] = ids[1:]
            scored[row, len(seq) - 1 - n_cont:len(seq) - 1] = True
        logits = model.logits_fn(inputs.to(device))
        assert logits.shape[:2] == (len(batch), width), (tuple(logits.shape), len(batch), width)
        mask = scored.to(logits.device)
        # Only the continuation positions go through log_softmax: full (batch, time, vocab) would double memory.
        logprobs = torch.log_softmax(logits[mask].float(), dim=-1)
        picked = logprobs.gather(1, targets.to(logits.device)[mask][:, None])[:, 0].double()
        rows = torch.arange(len(batch), device=logits.device)[:, None].expand(-1, width)[mask]
        sums = torch.zeros(len(batch), dtype=torch.float64, device=logits.device).index_add_(0, rows, picked).cpu()
        for row, k in enumerate(order[start:start + batch_size]):
            i, j = owners[k]
            n_cont = sequences[k][1]
            scores[i][j] = float(sums[row]) / (n_cont if length_normalize else 1)
    return scores


# ---- evaluation -------------------------------------------------------------------------------

def predict_label(candidates: Sequence[tuple[str, int]], scores: Sequence[float]) -> int:
    """The label whose best answer scores highest: ``scores[j]`` scores ``candidates[j]`` (answer text, label).
    Ties go to the lowest label id."""
    best: dict[int, float] = {}
    for (_, label), score in zip(candidates, scores, strict=True):
        best[label] = max(score, best.get(label, -float("inf")))
    return max(sorted(best), key=lambda label: best[label])


def _majority_label(labels: Sequence[int], n_labels: int) -> int:
    return int(np.argmax(np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_labels)))


def evaluate_task(model: ScoredModel, task: PromptTask, examples: Sequence[Example],
                  train_examples: Optional[Sequence[Example]] = None, limit: Optional[int] = None,
                  batch_size: int = 16, device: str | torch.device = "cpu") -> TaskResult:
    """Accuracy of ``model`` on the first ``limit`` examples, with ``task.shots`` demonstrations each."""
    if batch_size < 1 or (limit is not None and limit < 1):
        raise BadInput(f"task {task.name!r}: batch_size={batch_size} and limit={limit} must be positive")
    everything = list(examples)  # demonstrations come from all of it, so `limit` does not change a prompt
    examples = everything[:limit] if limit is not None else everything
    if not examples:
        raise BadInput(f"task {task.name!r}: no examples to evaluate")
    for i, example in enumerate(examples):
        _check_label(task, example, f"task {task.name!r}, example {i}")
    for i, example in enumerate(train_examples or []):
        if not 0 <= example.label < len(task.labels):
            raise BadInput(f"task {task.name!r}, train example {i}: label {example.label} is outside "
                           f"0..{len(task.labels) - 1}")
    pool = None if train_examples is None else list(train_examples)

    # An example with a candidate answer longer than the context cannot be scored: count it, leave it out.
    answers = {i: [task.answer_template.format(answer=a) for a, _ in
                   answer_candidates(task, e, f"task {task.name!r}, example {i}")] for i, e in enumerate(examples)}
    texts = sorted({a for cs in answers.values() for a in cs})
    lengths = {t: len(ids) for t, ids in zip(texts, model.encode(texts))}
    too_long = {t for t, n in lengths.items() if n > model.context}
    keep = [i for i in range(len(examples)) if not too_long.intersection(answers[i])]
    if not keep:
        raise BadInput(f"task {task.name!r}: every example has an answer longer than model {model.name}'s context "
                       f"of {model.context} tokens")

    predictions, guess_odds, loglikelihoods = [], [], []
    bar = tqdm(total=len(keep), desc=task.name, unit="example")
    for start in range(0, len(keep), batch_size):
        chunk = keep[start:start + batch_size]
        prompts = [build_prompt(task, examples[i], draw_demonstrations(task, everything, i, pool)) for i in chunk]
        candidates = [answer_candidates(task, examples[i], f"task {task.name!r}, example {i}") for i in chunk]
        sums = score_candidates(model, prompts, [answers[i] for i in chunk], False, batch_size, device,
                                where=[f"task {task.name!r}, example {i}" for i in chunk])
        for i, cs, ss in zip(chunk, candidates, sums):
            # As score_candidates' length_normalize: the sum over the answer's tokens, divided by their number.
            scores = [s / lengths[a] for s, a in zip(ss, answers[i])] if task.length_normalize else ss
            predictions.append((examples[i].label, predict_label(cs, scores)))
            guess_odds.append(1 / len({label for _, label in cs}))
            loglikelihoods.append(ss)
        bar.update(len(chunk))
    bar.close()

    confusion = np.zeros((len(task.labels), len(task.labels)), dtype=np.int64)
    for label, predicted in predictions:
        confusion[label, predicted] += 1
    truth = [label for label, _ in predictions]
    majority = _majority_label([e.label for e in train_examples] if train_examples else truth, len(task.labels))
    return TaskResult(
        name=task.name, shots=task.shots, accuracy=float(np.trace(confusion) / len(predictions)),
        confusion=confusion.tolist(), n=len(predictions), random_baseline=float(np.mean(guess_odds)),
        majority_baseline=float(np.mean([label == majority for label in truth])), predictions=predictions,
        labels=list(task.labels), skipped=len(examples) - len(keep), scored=keep, loglikelihoods=loglikelihoods)


def read_examples(reader: str, path: Path, labels_path: Optional[Path] = None) -> list[Example]:
    """Examples from one of the READERS, by name (the config's ``reader``)."""
    if reader not in READERS:
        raise BadInput(f"reader {reader!r} is unknown; readers: {', '.join(READERS)}")
    if reader == "piqa":
        if labels_path is None:
            raise BadInput(f"the piqa reader needs labels_path (the .lst file aligned with {path})")
        return read_piqa(Path(path), Path(labels_path))
    return READERS[reader](Path(path))


READERS = {"sst2": read_sst2, "piqa": read_piqa}



@dataclass
class PromptSuite:
    """One configured task: its PromptTask for each number of shots, the examples scored, the demonstrations' pool."""

    tasks: list[PromptTask]
    examples: list[Example]
    train_examples: Optional[list[Example]] = None  # None: demonstrations come from the other examples
    limit: Optional[int] = None

    def evaluate(self, model: ScoredModel, batch_size: int = 16, device: str | torch.device = "cpu") -> list[TaskResult]:
        return [evaluate_task(model, task, self.examples, self.train_examples, self.limit, batch_size, device)
                for task in self.tasks]


def prompt_suite(name: str, *, reader: str, path: str, template: str, labels: Sequence[str],
                 labels_path: Optional[str] = None, train_path: Optional[str] = None,
                 answers: Optional[dict[str, int]] = None, answer_template: str = " {answer}",
                 shots: Sequence[int] = (0,), separator: str = "\n\n", length_normalize: bool = False,
                 limit: Optional[int] = None, seed: int = 0) -> PromptSuite:
    """A task as the evaluate config states it (its keys are these arguments): the files are read and every
    PromptTask is checked here, so a bad template or answer map fails before any model is scored."""
    examples = read_examples(reader, Path(path), labels_path and Path(labels_path))
    train = read_examples(reader, Path(train_path), None) if train_path else None
    if not shots:
        raise BadInput(f"prompting task {name!r}: shots is empty; give the numbers of demonstrations, e.g. [0]")
    tasks = [PromptTask(name=name, template=template, labels=list(labels), answers=dict(answers) if answers else None,
                        answer_template=answer_template, shots=k, separator=separator,
                        length_normalize=length_normalize, seed=seed) for k in shots]
    return PromptSuite(tasks, examples, train, limit)
