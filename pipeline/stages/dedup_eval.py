"""dedup-eval: precision and recall of near-duplicate detection on the dedup stage's input, planted copies added."""
from __future__ import annotations

from pipeline.contract import StageConfig, StageContext, StageResult
from pipeline.dedup.io import eval_texts, read_input
from pipeline.dedup.report import near_eval, near_eval_lines

SECTIONS = ("dedup",)


def upstream(cfg: StageConfig) -> list[str]:
    return [cfg.dedup.input.stage] if cfg.dedup.input.stage else []


def run(cfg: StageConfig, ctx: StageContext) -> StageResult:
    docs = read_input(cfg.dedup.input, ctx.input_dirs)
    evaluation = near_eval(eval_texts(docs, cfg.dedup.eval), cfg.dedup.near, cfg.dedup.eval, ctx.build_dir)
    for path in evaluation.files:
        ctx.run.log_artifact(path)
    ctx.run.log_metrics(evaluation.metrics)
    print("\n".join(near_eval_lines(evaluation.summary)))
    return StageResult(counts={"near_eval": evaluation.summary}, metrics={},
                       outputs={"report": "near_eval.json", "plot": "near_detection.png"})
