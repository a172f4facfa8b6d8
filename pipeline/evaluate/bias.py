"""Bias probe on CrowS-Pairs: does the model find the more stereotypical sentence of a minimal pair more likely?

CrowS-Pairs (Nangia et al. 2020) holds 1,508 pairs of sentences that differ only in the group they name
(``sent_more``, the more stereotypical one, and ``sent_less``), in nine bias types. Each sentence is scored
whole, as lm-evaluation-harness's ``crows_pairs_english`` scores a causal model: its summed token
log-likelihood as the continuation of an empty context. ``pct_stereotype`` is the share of pairs where
``sent_more`` scores strictly higher; 50% means no preference between the two.

Agreement with the harness (lm-eval 0.4.13, ``tasks/crows_pairs/utils.py`` and ``models/huggingface.py``):
    scoring   the task's context is "" and its target_delimiter "", so each request is ("", sentence); for an
              empty context the harness scores the sentence's tokens after one ``prefix_token_id``. Here
              ``score_candidates`` scores them after ``model.prefix_id``. Both encode the sentence without
              special tokens, with the same tokenizer.json.
    prefix    ours is the document separator the model was trained after: ``</s>`` (id 1 in the demo exports,
              the EOS). The harness's default is the tokenizer's BOS (``<s>``, id 0 in our hf exports, which
              training never put before a document), falling back to the EOS only when there is no BOS. For
              the two to agree, run the harness with ``--model_args pretrained=<export>,prefix_token_id=1``
              (the export's eos_token_id), or, less sensibly, evaluate here with ``evaluate.prefix_token=<s>``.
              Checked on the first 40 pairs with outputs/demo/pretrain/hf: with prefix_token_id=1 the
              harness's log-likelihoods equal ours (from model.pt or from hf/) within 1.5e-5 and every winner
              is the same; with the default (<s>) they differ by up to 7 nats and 4 of 40 winners flip.
    direction ignored, as the harness ignores it: ``sent_more`` is the more stereotypical sentence in both
              "stereo" and "antistereo" pairs (in an antistereo pair ``sent_less`` violates a stereotype about
              a disadvantaged group and ``sent_more`` says the same of the contrasting advantaged group; the
              original paper's metric also counts ``sent_more`` winning in both directions). The share per
              direction is reported beside.
    ties      count as not stereotypical (the harness: ``1.0 if likelihood1 > likelihood2 else 0.0``).
    long      a sentence longer than the model's context cannot be scored whole (the harness asserts
              ``len(continuation) <= max_length`` and stops); here the pair is left out and counted in
              ``BiasResult.skipped``. No sentence is longer than 59 tokens with the demo tokenizer (context 128).
    data      the harness downloads ``jannalu/crows_pairs_multilingual`` (its README: a newer English version
              that fixes some issues of the original); this module reads the original file
              (``crows_pairs_anonymized.csv``), so compare with the harness on the same CSV, not with
              published harness tables.

Per-sentence sums are float64 of float32 log-probabilities; the harness sums in float32, so a pair whose two
sentences score within ~1e-5 of each other could fall on different sides in the two.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from pipeline.errors import BadInput
from pipeline.evaluate.models import ScoredModel
from pipeline.evaluate.prompting import score_candidates

COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")  # the columns read; others are ignored
DIRECTIONS = ("stereo", "antistereo")
CONFIDENCE = 0.95

CAVEATS = (
    "How to read this: the number is the share of CrowS-Pairs pairs in which the model gives the more "
    "stereotypical sentence the higher whole-sentence log-likelihood (50% = no preference; ties count as not "
    "stereotypical), scored as lm-evaluation-harness's `crows_pairs_english` scores causal models; the interval "
    "is a Wilson 95% binomial interval over pairs, per row, without correction for the number of rows. "
    "CrowS-Pairs is US-centred: it was written by US crowdworkers about stereotypes of historically "
    "disadvantaged groups in the US, so it says nothing about other cultures, languages or groups. The number "
    "measures the model's relative likelihood of minimally different sentences, not harm in what it generates "
    "or in any downstream use, and whole-sentence likelihood also rewards the more frequent group word, "
    "stereotype or not. A small model near 50% is not evidence of no bias: it may not have learned the "
    "associations the pairs probe, and with 60 to 500 pairs per type the intervals are wide. Blodgett et al. "
    "(2021) found that many CrowS-Pairs pairs are flawed (not minimal, not about a stereotype, contrasting "
    "mismatched groups, or ungrammatical), so per-pair, and especially per-type, results are noisy measures "
    "of what they claim to measure."
)


@dataclass
class CrowsPair:
    sent_more: str  # the more stereotypical sentence
    sent_less: str
    direction: str  # stereo | antistereo (see the module's docstring: sent_more is the stereotypical side in both)
    bias_type: str  # race-color, gender, ...
    row: int  # the file's first (unnamed) column, the pair's id in CrowS-Pairs: 0..1507 in file order


# ---- reading -----------------------------------------------------------------------------------

def read_crows_pairs(path: Path, limit: Optional[int] = None) -> list[CrowsPair]:
    """The first ``limit`` pairs of a CrowS-Pairs CSV (header with an unnamed index column, then ``COLUMNS``
    among others; quoted fields may hold commas and newlines). Errors name the file and the line a record
    starts on (the header is line 1)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist")
    if limit is not None and limit < 1:
        raise BadInput(f"{path}: limit={limit} must be positive (or null for every pair)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's BOM is not part of the header
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise BadInput(f"{path}: empty file; expected a header with columns {', '.join(COLUMNS)}")
    missing = [c for c in COLUMNS if c not in header]
    if missing or header[0] != "":
        what = f"has no column {', '.join(missing)}" if missing else f"starts with {header[0]!r}, not the unnamed index"
        raise BadInput(f"{path}, line 1: the header {what}; expected ',{','.join(COLUMNS)},...' as in "
                       f"crows_pairs_anonymized.csv")
    where_of = {c: header.index(c) for c in COLUMNS}

    pairs: list[CrowsPair] = []
    line = reader.line_num + 1  # the line the next record starts on
    while limit is None or len(pairs) < limit:
        try:
            record = next(reader, None)
        except csv.Error as e:  # e.g. a quote never closed
            raise BadInput(f"{path}, line {line}: not CSV ({e})") from e
        if record is None:
            break
        where = f"{path}, line {line}"
        line = reader.line_num + 1
        if not any(record):
            continue  # a blank line
        pairs.append(_pair(record, header, where_of, where))
    if not pairs:
        raise BadInput(f"{path}: no pairs after the header")
    return pairs


def _pair(record: list[str], header: list[str], where_of: dict[str, int], where: str) -> CrowsPair:
    if len(record) != len(header):
        raise BadInput(f"{where}: {len(record)} fields but the header has {len(header)} (a missing column or "
                       f"an unquoted comma)")
    try:
        row = int(record[0])
    except ValueError:
        raise BadInput(f"{where}: the index column holds {record[0]!r}, not a whole number") from None
    value = {c: record[i] for c, i in where_of.items()}
    for column in COLUMNS:
        if not value[column].strip():
            raise BadInput(f"{where} (pair {row}): {column} is empty")
    if value["stereo_antistereo"] not in DIRECTIONS:
        raise BadInput(f"{where} (pair {row}): stereo_antistereo is {value['stereo_antistereo']!r}, not one of "
                       f"{', '.join(DIRECTIONS)}")
    # Sentences are kept exactly as written (no stripping): the harness scores them as they are.
    return CrowsPair(value["sent_more"], value["sent_less"], value["stereo_antistereo"], value["bias_type"], row)


# ---- scoring -----------------------------------------------------------------------------------

def fitting_pairs(model: ScoredModel, pairs: Sequence[CrowsPair]) -> list[CrowsPair]:
    """The pairs whose two sentences each fit in the model's context (after the prefix token): only those can be
    scored whole."""
    texts = sorted({s for p in pairs for s in (p.sent_more, p.sent_less)})
    too_long = {t for t, ids in zip(texts, model.encode(texts)) if len(ids) > model.context}
    return [p for p in pairs if p.sent_more not in too_long and p.sent_less not in too_long]


def pair_loglikelihoods(model: ScoredModel, pairs: Sequence[CrowsPair], batch_size: int = 16,
                        device: str = "cpu", chunk_pairs: int = 256) -> list[tuple[float, float]]:
    """(log-likelihood of sent_more, of sent_less) in nats per pair: each sentence's tokens summed after
    ``model.prefix_id``. Every sentence must fit in the context (see :func:`fitting_pairs`)."""
    out: list[tuple[float, float]] = []
    bar = tqdm(total=len(pairs), desc=f"{model.name} on CrowS-Pairs", unit="pair")
    for start in range(0, len(pairs), chunk_pairs):
        chunk = pairs[start:start + chunk_pairs]
        scores = score_candidates(model, [""] * len(chunk), [[p.sent_more, p.sent_less] for p in chunk],
                                  length_normalize=False, batch_size=batch_size, device=device,
                                  where=[f"CrowS-Pairs pair {p.row}" for p in chunk])
        out += [(more, less) for more, less in scores]
        bar.update(len(chunk))
    bar.close()
    return out


# ---- the share and its interval -----------------------------------------------------------------

@dataclass
class Share:
    """How often sent_more won among ``n`` pairs, with a Wilson interval."""

    n: int
    wins: int  # pairs where sent_more's log-likelihood is strictly higher
    ci_low: float
    ci_high: float
    likelihood_diff: float  # mean |ll(sent_more) - ll(sent_less)|, the harness's other crows_pairs metric

    @property
    def pct_stereotype(self) -> float:
        return self.wins / self.n

    def metrics(self) -> dict[str, float]:
        return {"pct_stereotype": self.pct_stereotype, "pct_stereotype_ci_low": self.ci_low,
                "pct_stereotype_ci_high": self.ci_high, "likelihood_diff": self.likelihood_diff, "n": self.n}

    def cell(self) -> str:
        return f"{self.pct_stereotype:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def stereotype_share(loglikelihoods: Sequence[tuple[float, float]], confidence: float = CONFIDENCE) -> Share:
    """The share of (more, less) pairs where more > less (ties lose, as in the harness), and its Wilson interval."""
    from scipy.stats import binomtest

    assert loglikelihoods, "no pairs to share out"
    n = len(loglikelihoods)
    wins = sum(more > less for more, less in loglikelihoods)
    interval = binomtest(wins, n).proportion_ci(confidence_level=confidence, method="wilson")
    diff = sum(abs(more - less) for more, less in loglikelihoods) / n
    return Share(n, wins, float(interval.low), float(interval.high), diff)


@dataclass
class BiasResult:
    overall: Share
    by_type: dict[str, Share]  # bias type -> share, in descending number of pairs
    by_direction: dict[str, Share]  # stereo / antistereo -> share
    loglikelihoods: list[tuple[int, float, float]] = field(default_factory=list)  # (pair row, more, less)
    skipped: int = 0  # pairs left out: a sentence longer than the model's context

    def metrics(self) -> dict[str, float]:
        """pct_stereotype (and its interval, likelihood_diff, n) overall, <type>/..., direction/<dir>/...; skipped."""
        out = {**self.overall.metrics(), "skipped": self.skipped}
        for name, share in self.by_type.items():
            out.update({f"{name}/{k}": v for k, v in share.metrics().items()})
        for name, share in self.by_direction.items():
            out.update({f"direction/{name}/{k}": v for k, v in share.metrics().items()})
        return out


def _grouped(pairs: Sequence[CrowsPair], scores: Sequence[tuple[float, float]], key) -> dict[str, Share]:
    groups: dict[str, list[tuple[float, float]]] = {}
    for pair, score in zip(pairs, scores):
        groups.setdefault(key(pair), []).append(score)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return {name: stereotype_share(scores) for name, scores in ordered}


def bias_probe(model: ScoredModel, pairs: Sequence[CrowsPair], batch_size: int = 16,
               device: str = "cpu") -> BiasResult:
    """The share of pairs where ``model`` prefers the more stereotypical sentence: overall, per bias type and per
    direction. Pairs with a sentence longer than the context are left out and counted."""
    if batch_size < 1:
        raise BadInput(f"CrowS-Pairs: batch_size={batch_size} must be positive")
    kept = fitting_pairs(model, pairs)
    if not kept:
        raise BadInput(f"CrowS-Pairs: every pair has a sentence longer than model {model.name}'s context of "
                       f"{model.context} tokens")
    scores = pair_loglikelihoods(model, kept, batch_size, device)
    return BiasResult(
        overall=stereotype_share(scores),
        by_type=_grouped(kept, scores, lambda p: p.bias_type),
        by_direction=_grouped(kept, scores, lambda p: p.direction),
        loglikelihoods=[(p.row, more, less) for p, (more, less) in zip(kept, scores)],
        skipped=len(pairs) - len(kept))


# ---- report ------------------------------------------------------------------------------------

def bias_report(results: Sequence[tuple[str, BiasResult]]) -> tuple[str, dict[str, float]]:
    """(Markdown: a table with the groups down and the models across, each cell the share of pairs where the more
    stereotypical sentence wins and its 95% interval, then the caveats; metrics ``bias/<model>/...``) from
    (model name, BiasResult) pairs."""
    models = [m for m, _ in results]
    by = dict(results)
    assert results and len(by) == len(results), f"one result per model, got {models}"
    first = results[0][1]
    groups = [("all pairs", lambda r: r.overall)]
    types = list(dict.fromkeys(t for _, r in results for t in r.by_type))
    groups += [(t, lambda r, t=t: r.by_type.get(t)) for t in types]
    directions = [d for d in DIRECTIONS if any(d in r.by_direction for _, r in results)]
    groups += [(f"{d} pairs", lambda r, d=d: r.by_direction.get(d)) for d in directions]

    lines = ["| pairs | n | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for label, get in groups:
        shares = [get(by[m]) for m in models]
        ns = {s.n for s in shares if s is not None}
        same = len(ns) == 1  # models with different tokenizers may leave out different pairs
        cells = ["" if s is None else s.cell() + ("" if same else f" (n={s.n})") for s in shares]
        lines.append(f"| {label} | {ns.pop() if same else 'varies'} | " + " | ".join(cells) + " |")

    metrics: dict[str, float] = {}
    for m, r in results:
        metrics.update({f"bias/{m}/{k}": float(v) for k, v in r.metrics().items()})
    skipped = [f"{m}: {r.skipped}" for m, r in results if r.skipped]
    note = ("Pairs left out because a sentence is longer than the model's context: " + ", ".join(skipped) + ".\n\n"
            if skipped else "")
    header = ("Share of CrowS-Pairs pairs where the more stereotypical sentence is more likely under the model, "
              f"[95% Wilson interval]; {first.overall.n + first.skipped} pairs read.\n\n")
    return header + "\n".join(lines) + "\n\n" + note + CAVEATS + "\n", metrics
