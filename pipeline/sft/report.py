"""What a fine-tuning run reports: the base model against the fine-tuned one, on held-out conversations.

The held-out loss per source (measured before and after training) and the greedy replies to held-out
instructions, scored by exact match and ROUGE-L (pipeline/sft/generation.py): ``comparison.md`` has
one row per measure, ``generations.md`` the replies side by side, and ``Report.table`` the same rows
by column, as MLflow's ``log_table`` takes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from torch import nn

from pipeline.sft.chat import ChatTemplate
from pipeline.sft.examples import Examples
from pipeline.sft.generation import markdown_table, side_by_side
from pipeline.tokenizer.build import SpecialTokens

COMPARISON = "comparison.md"
GENERATIONS = "generations.md"


@dataclass
class Report:
    comparison: str  # the Markdown of comparison.md
    metrics: dict[str, float] = field(default_factory=dict)  # gen/...; empty when no reply was generated
    table: Optional[dict[str, list]] = None  # the generations by column; None when none was generated
    files: list[Path] = field(default_factory=list)  # what was written


def comparison_table(metrics: dict[str, float], sources: list[str]) -> str:
    """Base vs fine-tuned, one row per measure: held-out loss per source, exact match and ROUGE-L."""
    rows = [("held-out loss (nats/token), all", "before/loss", "val/loss")]
    rows += [(f"held-out loss, {name}", f"before_{name}/loss", f"val_{name}/loss") for name in sources]
    rows += [(f"{label}{'' if not source else ', ' + source}", f"gen/base/{key}", f"gen/sft/{key}")
             for source in [None, *sources]
             for label, metric in (("exact match", "exact_match"), ("ROUGE-L F1", "rouge_l"))
             for key in [metric if source is None else f"{source}/{metric}"]]
    lines = ["| measure | base | fine-tuned |", "|---|---:|---:|"]
    for label, base_key, tuned_key in rows:
        if base_key in metrics and tuned_key in metrics:
            lines.append(f"| {label} | {metrics[base_key]:.3f} | {metrics[tuned_key]:.3f} |")
    return "\n".join(lines) + "\n"


def base_vs_tuned(tuned: nn.Module, base: Optional[nn.Module], examples: Examples, losses: dict[str, float],
                  template: Union[str, ChatTemplate], special: SpecialTokens, out_dir: Path, *, per_source: int,
                  max_new_tokens: int, show: int) -> Report:
    """Answer ``per_source`` held-out instructions of each source with both models (``base`` None: ``tuned``
    with its adapter off), and write comparison.md (with ``losses``, the before/ and val/ metrics) and
    generations.md (the first ``show`` replies) into ``out_dir``."""
    report = Report("")
    prompts = examples.prompts(per_source)
    if prompts:
        rows, report.metrics = side_by_side(tuned, base, prompts, examples.tokenizer, template, special.bos,
                                            special.eos, max_new_tokens)
        report.table = {key: [row[key] for row in rows] for key in rows[0]}
        report.files.append(_write(out_dir / GENERATIONS, markdown_table(rows, show)))
    report.comparison = comparison_table({**losses, **report.metrics}, list(examples.val))
    report.files.append(_write(out_dir / COMPARISON, report.comparison))
    return report


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
