"""`python -m pipeline <stage> [hydra overrides]`: compose the config, run the stage under the contract.

Hydra's own flags work after the stage name: --help, --cfg job, -m/--multirun, --info.
User mistakes print as one line; HYDRA_FULL_ERROR=1 shows the traceback.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

from pipeline import PROJECT_ROOT
from pipeline.errors import shown_path
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


# The pip package of each Hydra launcher plugin a user may name (hydra/launcher=<name>).
LAUNCHER_PACKAGES = {"joblib": "hydra-joblib-launcher", "submitit_local": "hydra-submitit-launcher",
                     "submitit_slurm": "hydra-submitit-launcher", "ray": "hydra-ray-launcher",
                     "ray_aws": "hydra-ray-launcher", "rq": "hydra-rq-launcher"}


def missing_launcher(args: list[str]) -> str | None:
    """One line for a ``hydra/launcher=<name>`` among ``args`` that no installed plugin or conf/hydra/launcher/
    file provides, naming the plugin's package where known; None when every launcher named is there."""
    named = [a.split("=", 1)[1] for a in args if a.lstrip("+~").split("=", 1)[0] == "hydra/launcher" and "=" in a]
    if not named:
        return None
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    from omegaconf import OmegaConf

    Plugins.instance()  # discovers the installed plugins, which register their launchers' configs
    known = {Path(n).stem for n in ConfigStore.instance().repo.get("hydra", {}).get("launcher", {})}
    presets = {}  # ours (conf/hydra/launcher/), each over a plugin's launcher: usable when that one is installed
    for path in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"):
        base = [d for d in OmegaConf.load(path).get("defaults", []) if isinstance(d, str) and d != "_self_"]
        presets[path.stem] = base[0] if base else None
    known |= {name for name, base in presets.items() if base is None or base in known}
    for name in named:
        if name not in known:
            package = LAUNCHER_PACKAGES.get(presets.get(name) or name)
            return (f"hydra/launcher={name}: " + (f"its plugin is not installed (pip install {package})"
                                                  if package else "no such launcher")
                    + f"; launchers here: {', '.join(sorted(known))}")
    return None


def disk_full(error: BaseException, places: dict[str, str] | None = None) -> str | None:
    """One line for an error caused by a full disk or quota (ENOSPC or EDQUOT anywhere in its chain of causes:
    torch, Lightning and datasets wrap the OSError) naming the file, or None for any other error.

    A write() that fails names no file; then the line gives the free space of ``places`` (config key -> directory),
    so that a full one shows.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            what = f"{os.strerror(error.errno).lower()} ({errno.errorcode[error.errno]})"
            # Of two paths (a copy or a rename: source, destination) the destination is the one written.
            path = error.filename2 if error.filename2 is not None else error.filename
            if path is not None:
                return f"{what} writing {shown_path(path)}: free space there and rerun"
            filesystems = {}  # one place per filesystem
            for key, place in (places or {}).items():
                try:
                    device = os.stat(_existing(place)).st_dev
                    filesystems.setdefault(device, f"{key} {shown_path(place)} has {_free(place)}")
                except OSError:
                    continue
            return (f"{what} in a write that names no file" + "".join(f"; {f}" for f in filesystems.values())
                    + ": free space and rerun")
        error = error.__cause__ or error.__context__
    return None


def _existing(directory: str) -> Path:
    """``directory`` or its nearest parent that exists."""
    place = Path(directory).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    return place


def _free(directory: str) -> str:
    """'992 KiB free of 1 MiB' for the filesystem that holds ``directory``."""
    fs = os.statvfs(_existing(directory))

    def size(n: float) -> str:
        for unit in ("bytes", "KiB", "MiB", "GiB"):
            if n < 1024:
                return f"{n:.0f} {unit}"
            n /= 1024
        return f"{n:.0f} TiB"

    return f"{size(fs.f_bavail * fs.f_frsize)} free of {size(fs.f_blocks * fs.f_frsize)}"


def _places(cfg) -> dict[str, str]:
    """The directories stages write to, by config key, for disk_full; none where the config cannot say."""
    from omegaconf import OmegaConf

    try:
        return {f"paths.{key}": str(OmegaConf.select(cfg, f"paths.{key}")) for key in ("outputs_dir", "cache_dir")}
    except Exception:  # noqa: BLE001 - an error message is being written: the original error matters more
        return {}


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import CompactHydraException
    from hydra.types import RunMode

    from pipeline.config import load
    from pipeline.contract import execute_stage
    from pipeline.errors import PipelineError
    from pipeline.stages import load_stage
    from pipeline.sweep import JOB_CONFIG_ERROR_ENV, JOB_THREADS_ENV, SKIPPED
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
        if os.environ.get(JOB_THREADS_ENV):  # jobs side by side share the cores (set by the sweep's callback)
            import torch

            torch.set_num_threads(int(os.environ[JOB_THREADS_ENV]))
            tags["sweep_job_threads"] = os.environ[JOB_THREADS_ENV]

    class StageError(CompactHydraException):
        pass

    try:
        if os.environ.get(JOB_CONFIG_ERROR_ENV):  # a sweep job whose overrides did not compose: it fails alone
            raise PipelineError(os.environ[JOB_CONFIG_ERROR_ENV])
        manifest = execute_stage(stage, load_stage(stage), load(cfg), out_dir=out_dir,
                                 parent_run_id=os.environ.get(PARENT_RUN_ENV), run_name=run_name, extra_tags=tags,
                                 skip_complete=hc.mode == RunMode.MULTIRUN)
        return SKIPPED if manifest.get("skipped") else None
    except Exception as e:
        # A full disk is named even where a stage reported it as an unreadable input (datasets' cache).
        message = disk_full(e, _places(cfg)) or (str(e) if isinstance(e, PipelineError) else None)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise StageError(f"error: {stage}: {message}") from None


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

    launcher_error = missing_launcher(rest)
    if launcher_error:
        print(f"error: {launcher_error}", file=sys.stderr)
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
