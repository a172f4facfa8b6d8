"""Agreement with EleutherAI's lm-evaluation-harness: the same model and examples give the same numbers in both.

Users compare models with lm-evaluation-harness (lm-eval); a number from this project is comparable with theirs
only if the same model gives the same number in both. This module runs lm-eval's ``hf`` model on a transformers
export (``outputs/<exp>/<stage>/hf``) with local task definitions (``conf/harness/*.yaml``: SST-2 and PIQA as the
evaluate stage's prompting tasks ask them, CrowS-Pairs as lm-eval's ``crows_pairs_english`` scores it), runs the
project's own scoring on the same examples, and compares every candidate's log-likelihood and the accuracies.
The evaluate stage does this for every model with an export (:func:`harness_check`, ``evaluate.harness``).

These tasks run on any export from the repository root (``--limit`` or ``--samples`` to score fewer)::

    lm_eval --model hf --model_args pretrained=outputs/demo/pretrain/hf,prefix_token_id=1 \\
            --include_path conf/harness --tasks sst2_local,crows_pairs_local --device cpu --batch_size 16

and so does any task of lm-eval's own (which downloads its data), with the document separator before every
context as the project scores it: ``--tasks hellaswag --system_instruction '</s>'`` (see "prefix" below).

What each side computes (lm-eval 0.4.13: ``api/model.py`` TemplateLM.loglikelihood and _encode_pair,
``models/huggingface.py`` _loglikelihood_tokens, ``api/task.py`` process_results), and what makes them agree:

    prefix      The project scores every prompt after ``prefix_id``, the EOS ``</s>`` that every training
                document follows. lm-eval puts nothing before a non-empty context (``add_bos_token=True`` would
                put the tokenizer's BOS ``<s>``, which training never showed), and scores the continuation of an
                empty context after ``prefix_token_id`` (default: the BOS). So the SST-2 and PIQA task files set
                ``description: "</s>"`` (text lm-eval puts before every context; the export's tokenizer reads it
                as the special token), and lm-eval runs with ``prefix_token_id`` = the same token's id, which
                the empty contexts of CrowS-Pairs use. On other harness tasks, ``--system_instruction '</s>'``
                does what the description does here (lm-eval joins it to a task's own description with the
                task's fewshot_delimiter).
    tokens      The project encodes prompt and continuation separately and concatenates the ids. lm-eval moves
                a context's trailing whitespace into the continuation, encodes context + continuation whole and
                takes the tokens after the context's own. The two coincide when the byte-level pre-tokenizer
                splits at the boundary, as it does here: every prompt ends in ":" and every continuation starts
                with a space, which is never merged with the ":" before it. A template ending in whitespace
                would differ; the per-candidate comparison shows any such difference. A special token's text
                inside the data ("</s>", "[INST]") is that token to lm-eval's tokenizer and plain text to the
                project's (``encode_special_tokens``); none occurs in the three files.
    truncation  Both keep the last ``context + 1`` ids of a long sequence. An answer longer than the context:
                the prompting evaluation leaves the example out, lm-eval stops on an assertion; so lm-eval is
                given the project's examples (``samples``). On the demo exports (128 tokens) 6 of the first 300
                PIQA examples have such a solution: ``lm_eval --tasks piqa_local`` alone stops on them unless
                ``--samples`` leaves them out.
    sums        lm-eval's log_softmax and sum run in the logits' dtype, float32 by default: over a 120-token
                PIQA answer that alone is off by ~5e-5. Here it runs with ``softmax_dtype=float64`` (a model
                argument of its hf model); the project takes float32 log-probabilities and sums them in float64.
                Left: the two forward passes (ours and transformers' GPT-2, batched differently), ~1e-5 at most,
                hence the 1e-4 tolerance; two candidates that close could be ranked differently.
    rules       lm-eval's ``acc`` ranks candidates by summed log-likelihood; ``acc_norm`` by the sum divided by
                the answer's characters (the choice without the target delimiter). The project's
                ``length_normalize`` divides by the continuation's tokens, which lm-eval has no metric for. So
                the comparison is ``acc`` against the project's label rule on sums and ``acc_norm`` against it on
                sums per character, both from the project's own scores: for SST-2 (no normalisation) ``acc`` is
                the prompting table's number, for PIQA (per token) neither is.
    labels      Several answers may name one label (SST-2's "bad" is negative): lm-eval's gold is the list of
                that label's choices and counts the argmax being among them, the project scores a label by its
                best answer; the same ranking. Exact ties go to the first choice there, the lowest label here.
    shots       0-shot only: lm-eval draws demonstrations with its own sampler, the project per (seed, example).
    data        SST-2 and CrowS-Pairs through ``datasets``' csv reader, PIQA through :func:`piqa_dataset` (its
                labels are a file of their own); CrowS-Pairs is the original CSV, not the revised Hub copy
                lm-eval downloads, so its numbers are not those of published harness tables.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml
from tokenizers import Tokenizer

from pipeline import PROJECT_ROOT
from pipeline.errors import BadInput
from pipeline.evaluate.bias import (BiasResult, CrowsPair, fitting_pairs, pair_loglikelihoods, read_crows_pairs,
                                    stereotype_share)
from pipeline.evaluate.models import ScoredModel
from pipeline.evaluate.prompting import (Example, PromptSuite, PromptTask, TaskResult, answer_candidates,
                                         evaluate_task, predict_label, prompt_suite, read_piqa, render_prompts)
from pipeline.evaluate.report import Check

SHIPPED = PROJECT_ROOT / "conf" / "harness"  # the task files, with data paths relative to the repository root
HARNESS_TASKS = {"sst2": "sst2_local", "piqa": "piqa_local", "crows_pairs": "crows_pairs_local"}
TOLERANCE = 1e-4  # nats, per candidate
NAMES = {"acc": "accuracy", "acc_norm": "accuracy_norm", "pct_stereotype": "pct_stereotype"}  # metric names here
REQUIRED = ("task", "output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "dataset_kwargs")


# ---- task files --------------------------------------------------------------------------------

def piqa_dataset(data_files: str, labels_file: str, **_metadata):
    """PIQA for lm-eval (the task file's ``custom_dataset``, called with its ``dataset_kwargs`` and metadata): the
    ``{goal, sol1, sol2}`` lines of ``data_files`` with ``label`` from the aligned ``labels_file``, read by the
    project's reader, so a bad line fails with its file and line number."""
    import datasets

    rows = [{**e.fields, "label": e.label} for e in read_piqa(Path(data_files), Path(labels_file))]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


class _Function(str):
    """A task file's ``!function module.name``, kept as written (lm-eval resolves it when it loads the task)."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, f: dumper.represent_scalar("!function", str(f)))


def read_task_file(path: Path) -> dict:
    """A task YAML as a dict (``!function`` references kept), with the fields every task here needs."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist")
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(spec, dict):
        raise BadInput(f"{path}: expected a mapping of task fields, got {type(spec).__name__}")
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise BadInput(f"{path}: field {', '.join(missing)} is missing; a task needs {', '.join(REQUIRED)}")
    if not isinstance(spec["dataset_kwargs"], dict) or "data_files" not in spec["dataset_kwargs"]:
        raise BadInput(f"{path}: dataset_kwargs must hold data_files (the local data; nothing is downloaded)")
    return spec


def write_tasks(out_dir: Path, sst2_path: Optional[Path] = None, piqa_path: Optional[Path] = None,
                piqa_labels_path: Optional[Path] = None, crows_path: Optional[Path] = None, prefix_token: str = "</s>",
                source: Path = SHIPPED, cache_dir: Optional[Path] = None) -> Path:
    """Copies of the task files in ``source`` for the data given (SST-2; PIQA with its labels; CrowS-Pairs), their
    paths made absolute (lm-eval resolves relative ones from the working directory), ``description`` (the text
    before every context) set to ``prefix_token``, and datasets' cache in ``cache_dir`` (default
    ``out_dir/datasets``). Returns the folder to pass as lm-eval's include path: ``out_dir/tasks``."""
    out_dir = Path(out_dir)
    data = {"sst2_local": {"data_files": sst2_path},
            "piqa_local": {"data_files": piqa_path, "labels_file": piqa_labels_path},
            "crows_pairs_local": {"data_files": crows_path}}
    data = {name: files for name, files in data.items() if any(v is not None for v in files.values())}
    if not data:
        raise BadInput("write_tasks: no data given; pass the SST-2, PIQA or CrowS-Pairs paths")
    tasks = out_dir / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, files in data.items():
        file = Path(source) / f"{name}.yaml"
        spec = read_task_file(file)
        kwargs = dict(spec["dataset_kwargs"])
        for key, path in files.items():
            if path is None or not Path(path).is_file():
                raise BadInput(f"{path} does not exist (the data of harness task {name}, dataset_kwargs.{key})")
            path = str(Path(path).resolve())
            shipped = kwargs.get(key)
            if isinstance(shipped, dict) and len(shipped) != 1:
                raise BadInput(f"{file}: dataset_kwargs.{key} names splits {sorted(shipped)}; expected one")
            kwargs[key] = {split: path for split in shipped} if isinstance(shipped, dict) else path
        if "dataset_path" in spec:  # read by datasets.load_dataset, which caches what it builds
            kwargs["cache_dir"] = str(Path(cache_dir or out_dir / "datasets").resolve())
        spec["dataset_kwargs"] = kwargs
        if "description" in spec:
            spec["description"] = prefix_token
        text = yaml.dump(spec, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
        (tasks / f"{name}.yaml").write_text(f"# written by pipeline.evaluate.harness.write_tasks from {file}\n{text}",
                                            encoding="utf-8")
    return tasks


# ---- lm-eval's side ----------------------------------------------------------------------------

@dataclass
class HarnessResult:
    """One task as lm-eval scored it: its aggregate metrics and, per example (in file order), the context, the
    candidate continuations, their log-likelihoods and lm-eval's target (a choice index, or a list of them)."""

    task: str  # the project's name (sst2, piqa, crows_pairs)
    metrics: dict[str, float]  # lm-eval's, by its names: acc, acc_norm | pct_stereotype, likelihood_diff
    indices: list[int]  # each example's position in the task's data (lm-eval's doc_id)
    contexts: list[str]
    continuations: list[list[str]]
    loglikelihoods: list[list[float]]
    targets: list = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole lm-eval run this task was part of

    @property
    def n(self) -> int:
        return len(self.contexts)


def export_prefix_id(export_dir: Path, prefix_token: Optional[str] = None) -> int:
    """The id of ``prefix_token`` in the export's tokenizer, or when None its eos_token_id (as
    :func:`pipeline.evaluate.models.transformers_model` chooses the prefix)."""
    config = Path(export_dir) / "config.json"
    if not config.is_file():
        raise BadInput(f"{export_dir} is not a transformers export (no config.json): run the stage that exports it")
    if prefix_token is None:
        eos = json.loads(config.read_text()).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        if eos is None:
            raise BadInput(f"{config} has no eos_token_id; set evaluate.prefix_token")
        return int(eos)
    tokenizer_json = Path(export_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise BadInput(f"{export_dir} has no tokenizer.json")
    found = Tokenizer.from_file(str(tokenizer_json)).token_to_id(prefix_token)
    if found is None:
        raise BadInput(f"{tokenizer_json} has no token {prefix_token!r} (evaluate.prefix_token)")
    return found


@contextmanager
def _quiet(level: int = logging.ERROR):
    """lm-eval's logging held back while it runs: its task lists and model arguments, a warning per truncated
    request (the project truncates the same way, silently) and one about custom_dataset's arguments."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def run_harness(export_dir: Path, include_path: Path, tasks: Sequence[str], limit: Optional[int] = None,
                batch_size: int = 16, device: str = "cpu", prefix_token: Optional[str] = None,
                samples: Optional[dict[str, Sequence[int]]] = None,
                max_length: Optional[int] = None) -> dict[str, HarnessResult]:
    """lm-eval's ``hf`` model on the transformers export ``export_dir``, 0-shot, on each task (project names: keys
    of ``HARNESS_TASKS``) defined in ``include_path``: its first ``limit`` examples, or with ``samples`` (instead of
    a limit) the examples at those positions, e.g. a :class:`ProjectScores`' ``indices`` (lm-eval stops on an
    answer longer than the context; the project leaves such an example out). Empty contexts are scored after
    ``prefix_token`` (None: the export's EOS); ``max_length`` is the context lm-eval truncates to (None: the
    export's). One lm-eval run for all tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    unknown = [t for t in tasks if t not in HARNESS_TASKS]
    if unknown or not tasks:
        raise BadInput(f"harness tasks {unknown or '[]'}: expected some of {', '.join(HARNESS_TASKS)}")
    if limit is not None and limit < 1:
        raise BadInput(f"harness: limit={limit} must be positive (or null for every example)")
    if samples is not None and (limit is not None or set(samples) != set(tasks)):
        raise BadInput(f"harness: samples (for {sorted(samples)}) replaces limit (={limit}) and must name every "
                       f"task of {list(tasks)}")
    prefix_id = export_prefix_id(export_dir, prefix_token)
    names = {HARNESS_TASKS[t]: t for t in tasks}
    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    absent = [n for n in names if n not in manager.all_tasks]
    if absent:
        raise BadInput(f"{include_path} defines no task {', '.join(absent)}: write it with write_tasks")
    start = time.perf_counter()
    with _quiet():
        out = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(export_dir), "prefix_token_id": prefix_id, "dtype": "float32",
                                    "softmax_dtype": "float64", **({"max_length": max_length} if max_length else {})},
            tasks=list(names), limit=limit, batch_size=batch_size, device=device, task_manager=manager,
            samples=None if samples is None else {HARNESS_TASKS[t]: [int(i) for i in ix] for t, ix in samples.items()},
            log_samples=True, bootstrap_iters=0,  # no standard errors: nothing here compares them
            random_seed=None, numpy_random_seed=None, torch_random_seed=None)  # 0-shot scoring draws nothing:
    # leave the caller's random, numpy and torch generators as they were (lm-eval reseeds all three by default)
    seconds = time.perf_counter() - start
    return {names[name]: _result(names[name], out["results"][name], out["samples"][name], seconds)
            for name in names}


def _result(task: str, aggregate: dict, samples: list[dict], seconds: float) -> HarnessResult:
    metrics = {key.split(",")[0]: float(value) for key, value in aggregate.items()
               if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    samples = sorted(samples, key=lambda s: s["doc_id"])
    return HarnessResult(
        task=task, metrics=metrics, indices=[int(s["doc_id"]) for s in samples],
        contexts=[s["arguments"][0][0] for s in samples],
        continuations=[[continuation for _, continuation in s["arguments"]] for s in samples],
        loglikelihoods=[[float(ll) for ll, _ in s["filtered_resps"]] for s in samples],
        targets=[s["target"] for s in samples], seconds=seconds)


# ---- the project's side ------------------------------------------------------------------------

@dataclass
class ProjectScores:
    """One task as the project scores it, in the shape of a HarnessResult: per example the context lm-eval must
    show (the prefix token's text, then the prompt; "" where lm-eval adds the prefix as prefix_token_id), the
    continuations, their summed log-likelihoods, and the candidates that count as right."""

    task: str
    metrics: dict[str, float]  # by lm-eval's names, computed the project's way: acc, acc_norm | pct_stereotype
    indices: list[int]  # each example's position in the task's data; pass as run_harness's samples
    contexts: list[str]
    continuations: list[list[str]]
    loglikelihoods: list[list[float]]
    right: list[set[int]] = field(default_factory=list)  # candidate indices whose label is the example's
    skipped: int = 0  # examples left out: an answer longer than the model's context


def project_prompting(model: ScoredModel, task: PromptTask, examples: Sequence[Example], limit: Optional[int] = None,
                      batch_size: int = 16, device: str = "cpu", result: Optional[TaskResult] = None) -> ProjectScores:
    """A 0-shot prompting task as the evaluate stage scores it (:func:`evaluate_task` on the first ``limit``
    examples, or its ``result`` when the stage already has it, so nothing is scored twice), with the label chosen
    by its rule (``predict_label``) on the summed log-likelihoods (lm-eval's ``acc``) and on the sums per
    character of the answer (``acc_norm``). Examples the evaluation left out (an answer longer than the context)
    are left out here too."""
    if task.shots:
        raise BadInput(f"task {task.name!r}: the harness comparison is 0-shot, got shots={task.shots}")
    examples = list(examples)[:limit] if limit is not None else list(examples)
    result = result or evaluate_task(model, task, examples, batch_size=batch_size, device=device)
    if (result.name, result.shots, result.n + result.skipped) != (task.name, 0, len(examples)) or not result.scored:
        raise BadInput(f"task {task.name!r}: the prompting result given ({result.name}, {result.shots}-shot, "
                       f"{result.n + result.skipped} examples) is not this task's 0-shot evaluation of {len(examples)} "
                       f"examples with per-candidate log-likelihoods")
    kept = [examples[i] for i in result.scored]
    candidates = [answer_candidates(task, e, f"task {task.name!r}, example {i}") for i, e in zip(result.scored, kept)]
    sums = result.loglikelihoods
    per_char = [[s / len(a) for s, (a, _) in zip(ss, cs)] for ss, cs in zip(sums, candidates)]
    metrics = {rule: sum(predict_label(cs, ss) == e.label for cs, ss, e in zip(candidates, scores, kept)) / len(kept)
               for rule, scores in (("acc", sums), ("acc_norm", per_char))}
    prefix = model.tokenizer.id_to_token(model.prefix_id)
    right = [{j for j, (_, label) in enumerate(cs) if label == e.label} for cs, e in zip(candidates, kept)]
    return ProjectScores(task.name, metrics, list(result.scored), [prefix + p for p in render_prompts(task, kept)],
                         [[task.answer_template.format(answer=a) for a, _ in cs] for cs in candidates],
                         [list(ss) for ss in sums], right, result.skipped)


def project_crows(model: ScoredModel, pairs: Sequence[CrowsPair], batch_size: int = 16, device: str = "cpu",
                  result: Optional[BiasResult] = None) -> ProjectScores:
    """CrowS-Pairs ``pairs`` (the first of the file, in order) as :mod:`pipeline.evaluate.bias` scores them: each
    sentence after the prefix token, and the share of pairs where the more stereotypical one is more likely
    (``pct_stereotype``). With ``result`` (the stage's bias probe, on these pairs or more) nothing is scored again.
    Pairs with a sentence longer than the context are left out."""
    fit = {id(p) for p in fitting_pairs(model, pairs)}
    indices = [i for i, p in enumerate(pairs) if id(p) in fit]
    if not indices:
        raise BadInput(f"CrowS-Pairs: every pair has a sentence longer than model {model.name}'s context")
    kept = [pairs[i] for i in indices]
    if result is None:
        scores = pair_loglikelihoods(model, kept, batch_size, device)
    else:
        by_row = {row: (more, less) for row, more, less in result.loglikelihoods}
        missing = [p.row for p in kept if p.row not in by_row]
        if missing:
            raise BadInput(f"CrowS-Pairs: the bias result given has no scores for pairs {missing[:5]}; give one "
                           f"computed on at least these {len(pairs)} pairs")
        scores = [by_row[p.row] for p in kept]
    return ProjectScores("crows_pairs", {"pct_stereotype": stereotype_share(scores).pct_stereotype}, indices,
                         [""] * len(kept), [[p.sent_more, p.sent_less] for p in kept], [list(s) for s in scores],
                         [{0} for _ in kept], len(pairs) - len(kept))


# ---- agreement ---------------------------------------------------------------------------------

@dataclass
class Agreement:
    """The same numbers from lm-eval and from the project, on the same model and examples."""

    model: str
    task: str
    n: int  # examples compared
    harness: dict[str, float]  # lm-eval's metrics (acc, acc_norm | pct_stereotype)
    project: dict[str, float]  # the project's, same keys and rules
    max_abs_loglik_diff: float  # nats, over every candidate of every example
    tolerance: float = TOLERANCE

    @property
    def agrees(self) -> bool:
        return self.harness == self.project and self.max_abs_loglik_diff <= self.tolerance

    def summary(self) -> str:
        numbers = ", ".join(f"{k} {self.harness[k]:.4f} {'=' if self.harness[k] == self.project[k] else '!='} "
                            f"{self.project[k]:.4f}" for k in self.project)
        verdict = "agree" if self.agrees else "DISAGREE"
        return (f"{self.model}/{self.task}: lm-eval vs project {numbers}; max |log-lik diff| "
                f"{self.max_abs_loglik_diff:.1e} over {self.n} examples ({verdict})")

    def metrics(self) -> dict[str, float]:
        """``harness/<model>/<task>/{accuracy, project_accuracy, accuracy_norm, project_accuracy_norm,
        max_abs_loglik_diff, n}`` (``pct_stereotype`` and ``project_pct_stereotype`` for CrowS-Pairs)."""
        base = f"harness/{self.model}/{self.task}/"
        out = {}
        for key in self.project:
            out[base + NAMES[key]] = self.harness[key]
            out[base + "project_" + NAMES[key]] = self.project[key]
        return {**out, base + "max_abs_loglik_diff": self.max_abs_loglik_diff, base + "n": float(self.n)}


def agreement(model: str, project: ProjectScores, harness: HarnessResult, tolerance: float = TOLERANCE) -> Agreement:
    """Compare one task example by example. Different contexts, continuations or right answers mean the task file
    and the project's task no longer ask the same thing: that is an error, not a disagreement."""
    task = project.task
    if project.task != harness.task:
        raise BadInput(f"comparing the project's {project.task} with lm-eval's {harness.task}")
    if harness.indices != project.indices:
        raise BadInput(f"{task}: lm-eval scored {harness.n} examples, the project {len(project.indices)} (not the same "
                       f"ones); run lm-eval with samples = the project's indices")
    file = SHIPPED / f"{HARNESS_TASKS[task]}.yaml"

    def drifted(i: int, what: str, theirs, ours) -> BadInput:
        return BadInput(f"{task}, example {harness.indices[i]}: lm-eval's {what} {theirs!r} differ from the project's "
                        f"{ours!r}: the task file (from {file}) and the project's task no longer ask the same")

    for i in range(harness.n):
        if harness.contexts[i] != project.contexts[i]:
            raise drifted(i, "context", harness.contexts[i], project.contexts[i])
        if harness.continuations[i] != project.continuations[i]:
            raise drifted(i, "continuations", harness.continuations[i], project.continuations[i])
        target = harness.targets[i]
        if set(target if isinstance(target, list) else [target]) != project.right[i]:
            raise drifted(i, "right choices", target, sorted(project.right[i]))
    diffs = [abs(h - p) for hs, ps in zip(harness.loglikelihoods, project.loglikelihoods)
             for h, p in zip(hs, ps, strict=True)]
    diff = math.inf if any(not math.isfinite(d) for d in diffs) else max(diffs, default=0.0)  # NaN, inf: never agree
    missing = [k for k in project.metrics if k not in harness.metrics]
    if missing:
        raise BadInput(f"{task}: lm-eval reported no {', '.join(missing)}; {file} must list it in metric_list")
    return Agreement(model, task, harness.n, {k: harness.metrics[k] for k in project.metrics}, dict(project.metrics),
                     float(diff), tolerance)


def _cells(numbers: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in numbers.items())


def agreement_table(agreements: Sequence[Agreement]) -> str:
    """Markdown: one row per model and task, lm-eval's numbers beside the project's, and what they mean."""
    rows = ["| model | task | examples | lm-eval | project | max abs log-lik diff | agree |", "|---" * 7 + "|"]
    rows += [f"| {a.model} | {a.task} | {a.n} | {_cells(a.harness)} | {_cells(a.project)} | "
             f"{a.max_abs_loglik_diff:.1e} | {'yes' if a.agrees else '**no**'} |" for a in agreements]
    return "\n".join(rows) + (
        "\n\nacc ranks the candidates by summed log-likelihood, acc_norm by the sum per character of the answer "
        "(lm-eval's metrics; the project's numbers come from its own scores). The prompting table's PIQA accuracy "
        "divides by answer tokens instead, which lm-eval has no metric for. The log-likelihood difference is the "
        f"largest over every candidate of every example (agreement: at most {TOLERANCE:g} nats).")


# ---- the evaluate stage's check ----------------------------------------------------------------

@dataclass
class HarnessRun:
    """One model's comparison: an Agreement per task (and both sides' scores), or why it was not compared."""

    model: str
    agreements: list[Agreement] = field(default_factory=list)
    project: dict[str, ProjectScores] = field(default_factory=dict)  # by harness task (sst2, piqa, crows_pairs)
    harness: dict[str, HarnessResult] = field(default_factory=dict)
    seconds: float = 0.0  # lm-eval's run, its model loading included
    missing: str = ""  # why there is no comparison


def harness_check(evaluate, exports: dict[str, Optional[Path]], build_dir: Path, device: str = "cpu",
                  cache_dir: Optional[Path] = None) -> Check:
    """The evaluate stage's check: every model with a transformers export in ``exports`` scored by the project and
    by lm-eval on the same examples, 0-shot: the prompting tasks named in ``evaluate.harness.tasks`` (SST-2 and
    PIQA readers) and, with ``evaluate.harness.crows_pairs``, CrowS-Pairs from ``evaluate.bias.path``; the first
    ``evaluate.harness.limit`` examples of each (None: the task's own limit). ``evaluate`` is the stage's
    EvaluateConfig. The data and the task files are read here, before any model is loaded; each model's task files
    are written under ``build_dir/<model>``, datasets' cache in ``cache_dir``."""
    h = evaluate.harness
    tasks: dict[str, tuple[str, object, PromptSuite, Optional[int]]] = {}  # reader -> (name, config, suite, limit)
    for name in h.tasks:
        if name not in evaluate.tasks:
            raise BadInput(f"evaluate.harness.tasks: {name!r} is not an evaluate.tasks entry "
                           f"({', '.join(evaluate.tasks) or 'none'})")
        t = evaluate.tasks[name]
        if t.reader not in ("sst2", "piqa") or t.reader in tasks:
            raise BadInput(f"evaluate.harness.tasks: {name!r} reads {t.reader!r}; the harness has one task file for "
                           f"each of the sst2 and piqa readers")
        suite = prompt_suite(name, **{**asdict(t), "shots": [0], "train_path": None})  # 0-shot: no demonstrations
        tasks[t.reader] = (name, t, suite, h.limit if h.limit is not None else t.limit)
    pairs = None
    if h.crows_pairs:
        if not evaluate.bias.path:
            raise BadInput("evaluate.harness.crows_pairs needs evaluate.bias.path (crows_pairs_anonymized.csv)")
        pairs = read_crows_pairs(Path(evaluate.bias.path), h.limit if h.limit is not None else evaluate.bias.limit)
    if not tasks and pairs is None:
        raise BadInput("evaluate.harness is enabled with no tasks and crows_pairs off: nothing to compare")
    for name in [*tasks, *(["crows_pairs"] if pairs is not None else [])]:
        read_task_file(SHIPPED / f"{HARNESS_TASKS[name]}.yaml")
    paths = dict(sst2_path=tasks["sst2"][1].path if "sst2" in tasks else None,
                 piqa_path=tasks["piqa"][1].path if "piqa" in tasks else None,
                 piqa_labels_path=tasks["piqa"][1].labels_path if "piqa" in tasks else None,
                 crows_path=evaluate.bias.path if pairs is not None else None)

    def run(model_name: str, model: ScoredModel) -> HarnessRun:
        export = exports.get(model_name)
        if export is None:
            return HarnessRun(model_name, missing="no transformers export")
        project = {reader: dataclasses.replace(project_prompting(model, suite.tasks[0], suite.examples, limit,
                                                                 evaluate.batch_size, device), task=reader)
                   for reader, (_, _, suite, limit) in tasks.items()}
        if pairs is not None:
            project["crows_pairs"] = project_crows(model, pairs, evaluate.batch_size, device)
        prefix = model.tokenizer.id_to_token(model.prefix_id)
        include = write_tasks(Path(build_dir) / model_name, **paths, prefix_token=prefix, cache_dir=cache_dir)
        harness = run_harness(export, include, list(project), batch_size=evaluate.batch_size, device=device,
                              prefix_token=prefix, samples={t: p.indices for t, p in project.items()},
                              max_length=model.context)
        names = {reader: name for reader, (name, *_) in tasks.items()}
        agreements = [dataclasses.replace(agreement(model_name, project[t], harness[t]), task=names.get(t, t))
                      for t in project]
        return HarnessRun(model_name, agreements, project, harness, next(iter(harness.values())).seconds)

    return Check("harness", "Agreement with lm-evaluation-harness", run, harness_report)


def harness_report(results: Sequence[tuple[str, HarnessRun]], evaluation=None) -> tuple[str, dict[str, float]]:
    """(Markdown: the agreement table, a verdict, the models not compared and lm-eval's time per model; metrics
    ``harness/<model>/<task>/...`` and ``harness/<model>/seconds``) from the check's (model, HarnessRun) pairs."""
    runs = [r for _, r in results]
    agreements = [a for r in runs for a in r.agreements]
    metrics: dict[str, float] = {}
    for r in runs:
        for a in r.agreements:
            metrics.update(a.metrics())
        if not r.missing:
            metrics[f"harness/{r.model}/seconds"] = r.seconds
    parts = []
    if agreements:
        bad = [f"{a.model}/{a.task}" for a in agreements if not a.agrees]
        parts.append(f"All {len(agreements)} comparisons agree." if not bad else
                     f"**{len(bad)} of {len(agreements)} comparisons disagree: {', '.join(bad)}.**")
        parts.append(agreement_table(agreements))
        parts.append("lm-eval's wall time (its model loading included): " +
                     ", ".join(f"{r.model} {r.seconds:.0f} s" for r in runs if not r.missing) + ".")
    missing = [f"{r.model} ({r.missing})" for r in runs if r.missing]
    if missing:
        parts.append("Not compared: " + ", ".join(missing) + ".")
    return "\n\n".join(parts) + "\n", metrics
