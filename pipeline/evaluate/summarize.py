"""Zero-shot summarization, the GPT-2 way: append "TL;DR:" to a document and let the model continue.

The documents are Python PEPs (reStructuredText). A PEP with a top-level section titled "Abstract" gives
one example: the reference is the Abstract as plain text, the prompt is the rest of the PEP followed by
``SUFFIX``. The rest leaves out the RFC-822 header (``PEP: 8``, ``Title: ...`` up to the first blank
line), the Abstract, the back matter (top-level sections titled as in ``BACK_MATTER``: licence notice,
link lists) and rst comments (the Emacs ``Local Variables`` block). Back matter is left out because prompts
keep the body's end: without that rule nearly every prompt would end with the same licence sentence.

A prompt is ``prefix_id + body + SUFFIX`` as token ids (body and suffix encoded apart, so the suffix's ids
are the same in every prompt). One longer than ``context - max_new_tokens`` loses ids from the front (the
prefix, then the body's start): the suffix and the body's end are kept, and the generated tokens always
fit, so decoding never has to slide its window. A summary is what the model writes up to the end-of-document
token (the prefix token, which the token stream puts between documents) or up to its first blank line
(leading whitespace skipped), as GPT-2's paper kept only the first sentences it generated.

Candidates and references are scored as plain text (inline rst markup removed, see :func:`plain_inline`)
with ROUGE-1/2/L F1 from ``rouge-score`` (Porter stemmer on; rougeL is the LCS over the whole text, not
per sentence), averaged over documents, with the standard error of that mean. Two baselines, scored the
same way on the same documents, say what the numbers are worth: lead-3 (the body's first three sentences)
and random-3 (three sentences of the body drawn with a seed, in document order).
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.errors import BadInput
from pipeline.evaluate.models import ScoredModel
from pipeline.model.generate import DecodeSpec, generate

SUFFIX = "\nTL;DR:"
ABSTRACT = "abstract"
BACK_MATTER = frozenset({"copyright", "references", "footnotes", "references and footnotes",
                         "acknowledgements", "acknowledgments"})
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass
class SummaryDoc:
    id: str  # the record's id, e.g. "pep-0008"
    title: str
    body: str  # reStructuredText without header, Abstract, back matter and comments
    reference: str  # the Abstract as plain text, paragraphs joined by newlines
    line: int  # the record's line in the file (1-based), which also seeds its random choices


@dataclass
class PepSet:
    """The documents to summarize, and what the file held."""

    path: Path
    records: int  # PEPs in the file
    with_abstract: int  # of them with a top-level Abstract section and a non-empty body
    docs: list[SummaryDoc]  # the sample (in file order)
    seed: int = 0


# ---- reStructuredText -------------------------------------------------------------------------

_ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1*")  # one punctuation character, repeated
_EXPLICIT = re.compile(r"\.\.(\s|$)")  # directive, comment, footnote, target, substitution definition
_COMMENT = re.compile(r"\.\.(\s*$|\s+(?!\[|_|\||[\w.:+-]+::))")  # an explicit markup block that is none of those
_BULLET = re.compile(r"([-*+\u2022]|#\.|\d+[.)]|\(?[a-zA-Z0-9]\))\s+")
_TABLE_BORDER = re.compile(r"\s*(=+\s+)+=+\s*|\s*\+[-=+]+\+\s*")


def _adornment(line: str) -> Optional[str]:
    """The adornment character if ``line`` is a section adornment (or a transition), else None."""
    stripped = line.rstrip()
    return stripped[0] if len(stripped) >= 2 and _ADORNMENT.fullmatch(stripped) else None


@dataclass
class Section:
    title: str
    level: int  # 0 = top level; levels follow the order in which adornment styles first appear
    start: int  # first line of the title block (the overline if there is one)
    body_start: int  # first line after the underline
    end: int = -1  # first line after the section (its subsections included)


def _title_at(lines: Sequence[str], i: int) -> Optional[tuple[str, str, bool]]:
    """(title, adornment character, overlined) if a section title starts at ``lines[i]``, else None."""
    line = lines[i]
    below = lines[i + 1] if i + 1 < len(lines) else ""
    char = _adornment(line)
    if char is not None:  # an overline: the title (maybe inset) follows, then the same adornment
        if i + 2 < len(lines) and below.strip() and _adornment(below) is None and _adornment(lines[i + 2]) == char:
            return below.strip(), char, True
        return None
    under = _adornment(below)
    if under is None or not line.strip() or line[0].isspace() or (i > 0 and lines[i - 1].strip()):
        return None
    return (line.strip(), under, False) if len(below.rstrip()) >= len(line.rstrip()) else None


def find_sections(lines: Sequence[str]) -> list[Section]:
    """The section titles of ``lines`` as docutils reads them: a title line at the left margin after a blank
    line, underlined at least as long, or framed by an overline and an underline of one character (the title
    may then be inset). Indented lines (literal blocks) are never adornments, so code holds no titles."""
    styles: list[tuple[str, bool]] = []
    sections = []
    i = 0
    while i < len(lines):
        found = _title_at(lines, i)
        if found is None:
            i += 1
            continue
        title, char, overlined = found
        if (char, overlined) not in styles:
            styles.append((char, overlined))
        taken = 3 if overlined else 2
        sections.append(Section(title, styles.index((char, overlined)), i, i + taken))
        i += taken
    for k, s in enumerate(sections):
        s.end = next((t.start for t in sections[k + 1:] if t.level <= s.level), len(lines))
    return sections


def header_end(lines: Sequence[str]) -> int:
    """The first line after a PEP's RFC-822 header (``Key: value`` lines, indented continuations, to the
    first blank line); 0 when the text does not start with one."""
    if not lines or not re.match(r"[\w-]+:", lines[0]):
        return 0
    return next((i for i, line in enumerate(lines) if not line.strip()), len(lines))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _skip_block(lines: Sequence[str], i: int, indent: int) -> int:
    """The first line after ``lines[i]`` and the blank or deeper-indented lines that follow it."""
    i += 1
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
        i += 1
    return i


def _drop_comments(lines: list[str]) -> list[str]:
    """``lines`` without rst comments (``..`` blocks that are no directive, footnote, target or substitution)."""
    out, i = [], 0
    while i < len(lines):
        if _COMMENT.match(lines[i].lstrip()):
            i = _skip_block(lines, i, _indent(lines[i]))
        else:
            out.append(lines[i])
            i += 1
    return out


def split_pep(text: str) -> Optional[tuple[str, str]]:
    """(body, abstract) of a PEP's reStructuredText, both still rst; None without a top-level Abstract.

    The first top-level section titled "Abstract" is taken (PEP 207 quotes an older proposal's Abstract in
    an appendix); the Abstract's own subsections belong to it.
    """
    lines = text.splitlines()
    lines = lines[header_end(lines):]
    sections = find_sections(lines)
    abstract = next((s for s in sections if s.level == 0 and s.title.lower() == ABSTRACT), None)
    if abstract is None:
        return None
    dropped = [abstract] + [s for s in sections if s.level == 0 and s.title.lower() in BACK_MATTER]
    gone = set()
    for s in dropped:
        gone.update(range(s.start, s.end))
    body = _drop_comments([line for i, line in enumerate(lines) if i not in gone])
    body_text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in body)).strip()
    return body_text, "\n".join(lines[abstract.body_start:abstract.end]).strip()


def _role(match: re.Match) -> str:
    role, content = match.group(1), match.group(2)
    shown = re.fullmatch(r"(.*?)\s*<[^>]*>", content, re.S)
    if shown:
        return shown.group(1)
    content = content.lstrip("~!")
    return f"{role.upper()} {content}" if role in ("pep", "rfc") else content


def plain_inline(text: str) -> str:
    """``text`` without inline rst markup: literals (their content kept verbatim, backslashes too), roles
    (``:pep:`8``` reads "PEP 8"), hyperlinks (their text is kept, the target dropped), footnote references,
    emphasis, substitutions, escapes; whitespace collapsed."""
    parts = re.split(r"``(\S(?:.*?\S)?)``", text, flags=re.S)  # odd parts: inline literals' content
    return " ".join("".join(p if k % 2 else _plain_markup(p) for k, p in enumerate(parts)).split())


def _plain_markup(text: str) -> str:
    text = re.sub(r":(?:[\w+-]+:)?([\w+-]+):`([^`]*)`", _role, text)
    text = re.sub(r"`([^`<]*?)\s*<[^>`]*>`__?", r"\1", text)
    text = re.sub(r"`([^`]+)`(?:__?)?", r"\1", text)
    text = re.sub(r"\s*\[(?:#[\w.-]*|\*|\d+)\]_", "", text)
    text = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"\1", text, flags=re.S)
    text = re.sub(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])", r"\1", text, flags=re.S)
    text = re.sub(r"\|(\S(?:[^|]*\S)?)\|(?:__?)?", r"\1", text)
    return re.sub(r"\\(.)", r"\1", text)


def _block_end(lines: Sequence[str], i: int) -> int:
    """The first line after the table, line block or doctest block starting at ``lines[i]``: its next blank
    line, or for a simple table (which may hold blank lines) the blank line after its last border."""
    if lines[i].strip().startswith("=") and _TABLE_BORDER.fullmatch(lines[i]):
        for j in range(i + 1, len(lines)):
            if _TABLE_BORDER.fullmatch(lines[j]) and (j + 1 == len(lines) or not lines[j + 1].strip()):
                return j + 1
    while i < len(lines) and lines[i].strip():
        i += 1
    return i


def plain_paragraphs(rst: str) -> list[str]:
    """The prose of ``rst`` as plain-text paragraphs (each list item one paragraph).

    Left out: section titles and transitions; literal blocks (after ``::``), doctest blocks; directives,
    comments, footnotes and targets with their indented content (code-block, note, ... too); grid and
    simple tables. Block quotes stay as prose. Inline markup is removed by :func:`plain_inline`.
    """
    lines = rst.splitlines()
    titles = {s.start: s.body_start for s in find_sections(lines)}
    paragraphs: list[str] = []
    current: list[str] = []
    current_indent = 0  # the indent of the paragraph's first line
    literal_indent: Optional[int] = None  # set after a paragraph ending in "::": deeper lines are code

    def flush():
        nonlocal literal_indent
        text = " ".join(current)
        current.clear()
        if text.endswith("::"):  # "Text::" reads "Text:", "Text ::" reads "Text", "::" alone nothing
            literal_indent = current_indent
            head = text[:-2]
            text = head.rstrip() if not head or head[-1].isspace() else head + ":"
        text = plain_inline(text)
        if text:
            paragraphs.append(text)

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
            continue
        indent = _indent(line)
        if literal_indent is not None:
            if indent > literal_indent:
                i += 1
                continue
            literal_indent = None
        if i in titles:
            flush()
            i = titles[i]
        elif _adornment(line) is not None or _EXPLICIT.match(stripped):
            flush()
            i = _skip_block(lines, i, indent) if _EXPLICIT.match(stripped) else i + 1
        elif _TABLE_BORDER.fullmatch(line) or stripped.startswith(("|", ">>>")):
            flush()
            i = _block_end(lines, i)
        else:
            bullet = _BULLET.match(stripped)
            if bullet and (not current or indent <= current_indent):
                flush()
                stripped = stripped[bullet.end():]
            if not current:
                current_indent = indent
            current.append(stripped)
            i += 1
    flush()
    return paragraphs


_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")
_NO_END = {"e.g", "i.e", "cf", "vs", "viz", "mr", "mrs", "ms", "dr", "prof", "al", "approx", "no", "fig", "sec", "st"}


def sentences(paragraph: str) -> list[str]:
    """``paragraph`` split after ., ! or ? (and closing quotes or brackets) followed by whitespace and a capital
    or digit, unless the word before is an abbreviation (``_NO_END``) or an initial."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(paragraph):
        word = paragraph[start:m.start()].rsplit(None, 1)[-1].lower() if paragraph[start:m.start()].strip() else ""
        if word.rstrip(".") in _NO_END or re.fullmatch(r"[a-z]", word):
            continue
        out.append(paragraph[start:m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    return out + ([tail] if tail else [])


def body_sentences(body: str) -> list[str]:
    """The sentences of a body: each plain paragraph's sentences in order (a paragraph end ends a sentence,
    so a list item is one even without a full stop)."""
    return [s for p in plain_paragraphs(body) for s in sentences(p)]


# ---- reading ----------------------------------------------------------------------------------

def _records(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot be read as {'gzipped ' if opener is gzip.open else ''}UTF-8 JSON lines "
                       f"({e})") from e


def read_peps(path: Path, limit: Optional[int] = None, seed: int = 0) -> PepSet:
    """The PEPs of a JSON-lines file (``{id, title, text, ...}``, optionally gzipped) that have a top-level
    Abstract, and of those ``limit`` drawn without replacement by numpy's Generator seeded with ``seed``
    (all when None), kept in file order. PEPs without an Abstract are counted, not errors."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist: point the summarize path at peps.jsonl.gz (domain/python_peps)")
    if limit is not None and limit < 1:
        raise BadInput(f"summarize limit={limit}: must be at least 1 (or null for every PEP)")
    records, docs = 0, []
    for number, line in _records(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where}: not JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BadInput(f"{where}: expected a JSON object with a string 'text' (the PEP's reStructuredText)")
        records += 1
        split = split_pep(record["text"])
        if split is None or not split[0]:
            continue
        body, abstract = split
        reference = "\n".join(plain_paragraphs(abstract))
        if not reference:
            continue
        docs.append(SummaryDoc(str(record.get("id", f"line {number}")), str(record.get("title", "")), body,
                               reference, number))
    if not docs:
        raise BadInput(f"{path}: none of its {records} records has a top-level Abstract section to summarize")
    return PepSet(path, records, len(docs), sample_docs(docs, limit, seed), seed)


def sample_docs(docs: Sequence[SummaryDoc], limit: Optional[int], seed: int) -> list[SummaryDoc]:
    """``limit`` of ``docs`` drawn without replacement by numpy's Generator seeded with ``seed``, in their
    order; all of them when ``limit`` is None or not smaller."""
    if limit is None or limit >= len(docs):
        return list(docs)
    picks = np.sort(np.random.default_rng(seed).choice(len(docs), size=limit, replace=False))
    return [docs[int(i)] for i in picks]


# ---- scoring ----------------------------------------------------------------------------------

@dataclass
class Rouge:
    """ROUGE F1 per document for each of ROUGE_TYPES; the means and their standard errors."""

    scores: dict[str, list[float]]

    @property
    def n(self) -> int:
        return len(self.scores[ROUGE_TYPES[0]])

    def mean(self, kind: str) -> float:
        return float(np.mean(self.scores[kind]))

    def stderr(self, kind: str) -> float:
        """Standard error of the mean over documents (0 for one document)."""
        values = np.asarray(self.scores[kind])
        return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def rouge(candidates: Sequence[str], references: Sequence[str]) -> Rouge:
    """ROUGE-1/2/L F1 of each candidate against its reference (both made plain first)."""
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's "Using default tokenizer." per scorer

    assert len(candidates) == len(references) and candidates, (len(candidates), len(references))
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = {kind: [] for kind in ROUGE_TYPES}
    for candidate, reference in zip(candidates, references):
        got = scorer.score(plain_inline(reference), plain_inline(candidate))  # score(target, prediction)
        for kind in ROUGE_TYPES:
            scores[kind].append(got[kind].fmeasure)
    return Rouge(scores)


def lead_3(body: str) -> str:
    return " ".join(body_sentences(body)[:3])


def random_3(body: str, rng: np.random.Generator) -> str:
    found = body_sentences(body)
    picks = sorted(rng.choice(len(found), size=min(3, len(found)), replace=False)) if found else []
    return " ".join(found[int(i)] for i in picks)


def baselines(docs: Sequence[SummaryDoc], seed: int = 0) -> dict[str, Rouge]:
    """lead3 and random3, scored like the models; random3's draw for a PEP is seeded by (seed, its line)."""
    references = [d.reference for d in docs]
    return {"lead3": rouge([lead_3(d.body) for d in docs], references),
            "random3": rouge([random_3(d.body, np.random.default_rng([seed, d.line])) for d in docs], references)}


# ---- decoding ---------------------------------------------------------------------------------

def fit_prompt(body_ids: Sequence[int], suffix_ids: Sequence[int], prefix_id: int,
               budget: int) -> tuple[list[int], bool]:
    """(``prefix_id + body_ids + suffix_ids`` with ids cut from the front to at most ``budget``, whether any
    was cut). The suffix always stays whole, with at least one body id before it."""
    assert budget > len(suffix_ids), f"a budget of {budget} ids cannot hold {len(suffix_ids)} suffix ids + 1"
    ids = [prefix_id, *body_ids, *suffix_ids]
    return ids[-budget:], len(ids) > budget


def summary_text(tokenizer, new_ids: Sequence[int], eos_id: Optional[int]) -> str:
    """The generated ids as a summary: up to eos, leading whitespace skipped, up to the first blank line."""
    if eos_id is not None and eos_id in new_ids:
        new_ids = new_ids[:list(new_ids).index(eos_id)]
    text = tokenizer.decode(list(new_ids), skip_special_tokens=True).lstrip()
    return re.split(r"\n[ \t]*\n", text, maxsplit=1)[0].strip()


def _doc_seed(seed: int, line: int) -> int:
    """A sample's seed for one PEP: depends on the PEP, not on which others are in the subset."""
    return int(np.random.SeedSequence([seed, line]).generate_state(1)[0])


@torch.no_grad()
def _hf_generate(network, prompt: list[int], spec: DecodeSpec, eos_id: int) -> list[int]:
    """The new ids from transformers' generate, set up as our greedy or top-k/top-p sampling: the same
    processing of the logits (temperature, then top-k, then top-p), stopping at ``eos_id``; the sample is
    drawn from torch's global generator seeded with ``spec.seed`` (its state is restored afterwards)."""
    from transformers import GenerationConfig

    sample = spec.strategy == "sample"
    config = GenerationConfig(max_new_tokens=spec.max_new_tokens, do_sample=sample, num_beams=1,
                              eos_token_id=eos_id, pad_token_id=eos_id,
                              **(dict(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p)
                                 if sample else {}))
    device = next(network.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        out = network.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


def _decoder(model: ScoredModel, spec: DecodeSpec, name: str, eos_id: int):
    if model.network is None:
        raise BadInput(f"model {model.name}: summarize needs the loaded network to decode with (load it with load_any)")
    if model.kind == "pipeline":
        return lambda prompt, s: generate(model.network, prompt, s, eos_id=eos_id)
    if model.kind == "transformers":
        if spec.strategy == "beam":
            raise BadInput(f"summarize decoding {name!r}: model {model.name} is a transformers model, decoded "
                           f"with transformers' generate, whose beam search stops by other rules than ours; "
                           f"use strategy greedy or sample for it")
        return lambda prompt, s: _hf_generate(model.network, prompt, s, eos_id)
    raise BadInput(f"model {model.name}: summarize cannot decode a model of kind {model.kind!r}")


@dataclass
class DecodingResult:
    rouge: Rouge
    summaries: list[str]
    new_tokens: float  # mean ids generated per document (eos included), before the cut at a blank line
    empty: int  # summaries with no text


@dataclass
class SummaryResult:
    model: str
    n: int
    cut: int  # prompts that lost ids from the front
    max_new_tokens: int
    prompt_budget: int  # context - max_new_tokens: the most ids a prompt keeps
    decodings: dict[str, DecodingResult]
    examples: list[tuple[str, str]] = field(default_factory=list)  # (PEP id, reference) for the first documents
    seconds: float = 0.0


def _check_room(model: ScoredModel, suffix_ids: list[int], max_new_tokens: int, source: str) -> int:
    budget = model.context - max_new_tokens
    if budget > len(suffix_ids):
        return budget
    most = model.context - len(suffix_ids) - 1
    fix = (f"lower evaluate.summarize.max_new_tokens to at most {most}" if most >= 1 else
           "the context is too short for any summary; leave the model out of summarize")
    raise BadInput(f"model {model.name}: its context of {model.context} tokens cannot hold {SUFFIX!r} "
                   f"({len(suffix_ids)} tokens), max_new_tokens={max_new_tokens} and one token of a PEP from "
                   f"{source}: {fix}")


def summarize(model: ScoredModel, docs: Sequence[SummaryDoc], decodings: Mapping[str, DecodeSpec],
              max_new_tokens: int, source: str = "the PEPs", cpu_threads: Optional[int] = 1,
              examples: int = 3, eos_id: Optional[int] = None) -> SummaryResult:
    """``model``'s "TL;DR:" summary of every document under each named decoding, scored with ROUGE.

    ``max_new_tokens`` replaces each spec's own; a sample is seeded by (spec.seed, the PEP's line). Decoding
    runs where the model was loaded. On the CPU it uses ``cpu_threads`` torch threads (None: as set), restored
    afterwards: one prompt at a time, a small model's steps are too small to share between threads, and on
    2 busy cores the demo model took 149 s with 2 threads against 20 s with 1. ``source`` (the file) is
    named in errors; ``examples`` documents keep their summaries for the report. A summary stops at ``eos_id``
    (None: the model's prefix id, which is the end-of-document token unless evaluate.prefix_token says
    otherwise).
    """
    eos_id = model.prefix_id if eos_id is None else eos_id
    if not docs:
        raise BadInput(f"summarize: no documents from {source}")
    if not decodings:
        raise BadInput("summarize: decodings is empty; name at least one, e.g. greedy: {strategy: greedy}")
    if max_new_tokens < 1:
        raise BadInput(f"summarize max_new_tokens={max_new_tokens}: must be at least 1")
    started = time.perf_counter()
    decoders = {name: _decoder(model, spec, name, eos_id) for name, spec in decodings.items()}
    [suffix_ids] = model.encode([SUFFIX])
    budget = _check_room(model, suffix_ids, max_new_tokens, source)
    fitted = [fit_prompt(ids, suffix_ids, model.prefix_id, budget) for ids in model.encode([d.body for d in docs])]
    threads = torch.get_num_threads()
    on_cpu = next(model.network.parameters()).device.type == "cpu"
    if on_cpu and cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        results = {}
        bar = tqdm(total=len(docs) * len(decodings), desc=f"summarize {model.name}", unit="summary")
        for name, spec in decodings.items():
            spec = replace(spec, max_new_tokens=max_new_tokens)
            summaries, lengths = [], []
            for doc, (prompt, _) in zip(docs, fitted):
                new = decoders[name](prompt, replace(spec, seed=_doc_seed(spec.seed, doc.line)))
                lengths.append(len(new))
                summaries.append(summary_text(model.tokenizer, new, eos_id))
                bar.update()
            results[name] = DecodingResult(rouge(summaries, [d.reference for d in docs]), summaries,
                                           float(np.mean(lengths)), sum(not s for s in summaries))
        bar.close()
    finally:
        torch.set_num_threads(threads)
    return SummaryResult(model.name, len(docs), sum(cut for _, cut in fitted), max_new_tokens, budget, results,
                         [(d.id, d.reference) for d in docs[:examples]], time.perf_counter() - started)


# ---- report -----------------------------------------------------------------------------------

def _cells(r: Rouge) -> str:
    return " | ".join(f"{r.mean(k):.3f} ± {r.stderr(k):.3f}" for k in ROUGE_TYPES)


def summary_report(results: Sequence[tuple[str, SummaryResult]], baseline: Mapping[str, Rouge],
                   peps: Optional[PepSet] = None) -> tuple[str, dict[str, float]]:
    """(Markdown: what was summarized and how, one ROUGE table with the baselines under the models, example
    summaries; metrics ``summarize/<model>/<decoding>/{rouge1,rouge2,rougeL,empty}``, ``summarize/<model>/cut``,
    ``summarize/baseline/<lead3|random3>/{rouge1,rouge2,rougeL}``) from (model name, SummaryResult) pairs."""
    metrics: dict[str, float] = {}
    lines = []
    n = next((r.n for _, r in results), next((r.n for r in baseline.values()), 0))
    if peps is not None:
        drawn = f"drawn with seed {peps.seed} " if n < peps.with_abstract else ""
        lines.append(f"{n} PEPs {drawn}from the {peps.with_abstract} of {peps.records} in `{peps.path.name}` "
                     f"that have a top-level Abstract. Prompt: the PEP without header, Abstract and back matter, "
                     f"then `{SUFFIX.strip()}`, cut from the front to context - max_new_tokens when longer. "
                     f"A summary ends at the end-of-document token or its first blank line. ROUGE F1 (stemmed) "
                     f"against the Abstract, mean ± standard error over documents.\n")
    lines += ["| model | decoding | documents | cut to fit (prompt ≤ tokens) | empty summaries | ROUGE-1 | ROUGE-2 "
              "| ROUGE-L |", "|---" * 8 + "|"]
    for model, result in results:
        for name, d in result.decodings.items():
            lines.append(f"| {model} | {name} | {result.n} | {result.cut} (≤ {result.prompt_budget}) | {d.empty} "
                         f"| {_cells(d.rouge)} |")
            for kind in ROUGE_TYPES:
                metrics[f"summarize/{model}/{name}/{kind}"] = d.rouge.mean(kind)
            metrics[f"summarize/{model}/{name}/empty"] = d.empty
        metrics[f"summarize/{model}/cut"] = result.cut
    for name, r in baseline.items():
        lines.append(f"| baseline | {name} | {r.n} | | | {_cells(r)} |")
        for kind in ROUGE_TYPES:
            metrics[f"summarize/baseline/{name}/{kind}"] = r.mean(kind)
    lines.append("")
    for model, result in results:
        for k, (pep, reference) in enumerate(result.examples):
            lines.append(f"**{model}, {pep}.** Reference: {reference[:300]!r}")
            lines += [f"- {name}: {d.summaries[k][:300]!r}" for name, d in result.decodings.items()]
            lines.append("")
    return "\n".join(lines), metrics
