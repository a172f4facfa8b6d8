"""filter: crawl pages in, clean documents out; every rejected document keeps the rule that removed it."""
from __future__ import annotations

import dataclasses
import json

from omegaconf import DictConfig, OmegaConf

from pipeline.config import typed
from pipeline.contract import StageContext, StageResult
from pipeline.filter.plots import plot_funnel
from pipeline.filter.run import CrawlSource, run_filter
from pipeline.filter.steps import StepsSpec

SECTIONS = ("filter",)


def upstream(cfg: DictConfig) -> list[str]:
    return []


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    f = cfg.filter
    sources = {name: typed(node, CrawlSource, f"filter.sources.{name}") for name, node in f.sources.items()}
    steps = typed({s.name: OmegaConf.to_container(f[s.name], resolve=True) for s in dataclasses.fields(StepsSpec)},
                  StepsSpec, "filter")
    stats = run_filter(sources, steps, ctx.build_dir, num_proc=f.num_proc, samples_per_rule=f.samples_per_rule)

    n_in = sum(s["input"] for s in stats["per_source"].values())
    n_kept = sum(s["kept"] for s in stats["per_source"].values())
    (ctx.build_dir / "rejected_samples.json").write_text(json.dumps(stats["samples"], indent=1, ensure_ascii=False))
    ctx.run.log_artifact(ctx.build_dir / "rejected_samples.json")
    ctx.run.log_artifact(plot_funnel(stats["funnel"], stats["rules"], ctx.build_dir / "funnel.png"))
    metrics = {"filter/input_documents": n_in, "filter/kept_documents": n_kept,
               "filter/rejected_documents": n_in - n_kept, "filter/kept_fraction": n_kept / max(n_in, 1),
               "filter/input_mb": stats["bytes_in"] / 1e6, "filter/kept_chars": stats["chars_kept"],
               **{f"filter/pii_{kind}": n for kind, n in stats["pii"].items()},
               **{f"filter/removed/{rule}": n for rule, n in stats["rules"].items()},
               **{f"filter/removed_fraction/{rule}": n / max(n_in, 1) for rule, n in stats["rules"].items()},
               **{f"filter/left_after/{step}": n for step, n in stats["funnel"][1:]}}
    counts = {"input": n_in, "kept": n_kept, "rejected": n_in - n_kept, "per_source": stats["per_source"],
              "rejected_by_rule": stats["rules"], "pii_redacted": stats["pii"],
              "funnel": dict(stats["funnel"])}
    outputs = {"kept": "kept/*.parquet", "rejected": "rejected/*.parquet", "plot": "funnel.png",
               "rejected_samples": "rejected_samples.json"}
    return StageResult(counts=counts, metrics=metrics, outputs=outputs)
