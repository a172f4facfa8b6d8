"""`python -m pipeline <stage> [hydra overrides]`: compose the config, run the stage under the contract.

Hydra's own flags work after the stage name: --help, --cfg job, -m/--multirun, --info.
User mistakes print as one line; HYDRA_FULL_ERROR=1 shows the traceback.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline import PROJECT_ROOT
from pipeline.stages import STAGES, TOOLS

CONF_DIR = PROJECT_ROOT / "conf"
STAGE_ENV = "PIPELINE_STAGE"


def usage() -> str:
    width = max(map(len, {**STAGES, **TOOLS}))
    lines = [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
    tools = [f"  {name:<{width}}  {desc}" for name, (_, desc) in TOOLS.items()]
    return "\n".join([
        "usage: python -m pipeline <stage> [key=value ...] [--help] [--cfg job] [-m]",
        "",
        "stages:",
        *lines,
        "",
        "tools (their own output folder and MLflow run, outside `make all`):",
        *tools,
        "",
        "examples:",
        "  python -m pipeline tokenize tokenizer.vocab_size=8000",
        "  python -m pipeline tokenize -m tokenizer.vocab_size=512,1024   # a sweep: one MLflow parent run",
        "  python -m pipeline tokenize --cfg job                           # print the composed config",
        "  python -m pipeline tokenize --help                              # groups and options",
    ])


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import CompactHydraException
    from hydra.types import RunMode

    from pipeline.config import load
    from pipeline.contract import execute_stage
    from pipeline.errors import PipelineError
    from pipeline.stages import load_stage
    from pipeline.tracking import PARENT_RUN_ENV

    hc = HydraConfig.get()
    stage = os.environ[STAGE_ENV]  # not hc.job.name: Lightning renames the job of the DDP processes it starts
    out_dir, run_name, tags = None, stage, {}
    if hc.mode == RunMode.MULTIRUN:
        # Each job of a sweep writes beside its Hydra job directory, not over outputs/<exp>/<stage>.
        out_dir = Path(hc.runtime.output_dir) / stage
        run_name = f"{stage}-{hc.job.num}"
        tags = {"overrides": hc.job.override_dirname, "sweep_job": str(hc.job.num),
                "sweep_overrides": json.dumps(list(hc.overrides.task))}
    try:
        execute_stage(stage, load_stage(stage), load(cfg), out_dir=out_dir,
                      parent_run_id=os.environ.get(PARENT_RUN_ENV), run_name=run_name, extra_tags=tags)
    except PipelineError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise

        class StageError(CompactHydraException):
            pass

        raise StageError(f"error: {stage}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES and stage not in TOOLS and "LOCAL_RANK" in os.environ and os.environ.get(STAGE_ENV):
        # A DDP process that Lightning started: it repeats our arguments after the stage name only.
        stage, rest = os.environ[STAGE_ENV], argv
    if stage not in STAGES and stage not in TOOLS:
        print(f"error: unknown stage '{stage}'; stages: {', '.join([*STAGES, *TOOLS])}", file=sys.stderr)
        return 2

    import signal

    import hydra

    from pipeline import config  # noqa: F401  registers the schema and the ${root:} resolver
    from pipeline.errors import StageKilled
    from pipeline.tracking import kill_handler

    # Outside a stage's run too (composing, between sweep jobs), a SIGTERM unwinds the stack, so
    # atexit closes a sweep's parent run instead of leaving it RUNNING.
    signal.signal(signal.SIGTERM, kill_handler([]))

    # conf/config.yaml names the Hydra job after this variable (log and sweep folders, run names).
    os.environ[STAGE_ENV] = stage
    sys.argv = [f"python -m pipeline {stage}", *rest]
    entry = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)
    try:
        entry()
    except StageKilled as e:
        print(f"{stage}: {e}; an open MLflow run is marked KILLED and the previous output is untouched",
              file=sys.stderr)
        return 128 + getattr(signal, e.signal_name, signal.SIGTERM).value
    except KeyboardInterrupt:
        print(f"{stage}: interrupted; the MLflow run is marked KILLED and the previous output is untouched",
              file=sys.stderr)
        return 130
    return 0
