"""dedup-eval: precision and recall of near-duplicate detection on the dedup stage's input, planted copies added."""
from __future__ import annotations

from omegaconf import DictConfig

from pipeline.contract import StageContext, StageResult
from pipeline.stages import dedup

SECTIONS = ("dedup",)


def upstream(cfg: DictConfig) -> list[str]:
    return dedup.upstream(cfg)


def run(cfg: DictConfig, ctx: StageContext) -> StageResult:
    table, _ = dedup.read_input(cfg, ctx)
    report = dedup.evaluate(cfg, ctx, table)
    o = report["overall"]
    print(f"near-duplicates at threshold {report['threshold']} (b={report['bands']}, r={report['rows']}, "
          f"verify={report['verify']}): precision {o['precision']:.3f}, recall {o['recall']:.3f} over "
          f"{o['true_pairs']} true pairs ({report['documents']} documents + {report['planted']} planted copies)")
    for rate, row in report["by_edit_rate"].items():
        print(f"  copies with {float(rate):6.1%} of words edited: mean Jaccard {row['mean_jaccard']:.3f}, "
              f"detected {row['detected']:.0%}")
    return StageResult(counts={"near_eval": report}, metrics={},
                       outputs={"report": "near_eval.json", "plot": "near_detection.png"})
