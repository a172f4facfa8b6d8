"""The stage contract: declared inputs, build aside then rename, manifest last, one tracked run.

A stage module provides
    SECTIONS  the config keys that define its output (hashed, logged as params),
    upstream(cfg) -> list of upstream stage names it reads,
    run(cfg, ctx) -> StageResult, writing only into ctx.build_dir.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.errors import BadInput, MissingUpstream, PipelineError
from pipeline.tracking import StageRun, TrackingSettings, flatten, stage_run

MANIFEST = "manifest.json"


@dataclass
class Upstream:
    """A finished upstream stage: its directory and manifest."""

    stage: str
    dir: Path
    manifest: dict
    hash: str

    @property
    def run_id(self) -> Optional[str]:
        return self.manifest.get("mlflow_run_id")


@dataclass
class StageContext:
    build_dir: Path  # write everything here; it is renamed into place after the manifest
    inputs: dict[str, Upstream]
    run: StageRun
    cache_dir: Path


@dataclass
class StageResult:
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # stage-specific index of what it wrote


def stage_dir(outputs_dir: Path, experiment: str, stage: str) -> Path:
    return Path(outputs_dir) / experiment / stage


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_upstream(outputs_dir: Path, experiment: str, stage: str) -> Upstream:
    directory = stage_dir(outputs_dir, experiment, stage)
    path = directory / MANIFEST
    if not path.is_file():
        exp = "" if experiment == "demo" else f" EXP={experiment}"
        raise MissingUpstream(f"{_shown(path)} is missing: run 'make {stage}{exp}' first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{_shown(path)} is not valid JSON ({e.msg}): run 'make -B {stage}' to rebuild it") from e
    return Upstream(stage, directory, manifest, file_hash(path))


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit(root: Path = PROJECT_ROOT) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    return f"{commit}-dirty" if dirty and commit != "unknown" else commit


@contextmanager
def stage_lock(final_dir: Path, stage: str) -> Iterator[None]:
    """One execution of a stage per output directory at a time; a second fails at once."""
    path = Path(final_dir).with_name(f".{Path(final_dir).name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"another {stage} run is writing {_shown(final_dir)}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


TERMINATING = {signal.SIGTERM, signal.SIGINT}


@contextmanager
def building(final_dir: Path) -> Iterator[Path]:
    """Yield an empty sibling directory; on success (manifest present) it replaces ``final_dir``.

    On an exception or a kill the partial directory stays for inspection (the next run wipes it)
    and ``final_dir`` is untouched.
    """
    final_dir = Path(final_dir)
    partial = final_dir.with_name(f".{final_dir.name}.partial")
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists() and not final_dir.exists():  # a previous swap was cut between its two renames
        old.rename(final_dir)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    yield partial
    assert (partial / MANIFEST).is_file(), f"{partial} has no {MANIFEST}: the manifest is written last"
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        final_dir.rename(old)
    partial.rename(final_dir)
    if old.exists():
        shutil.rmtree(old)


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def tracking_settings(cfg: DictConfig) -> TrackingSettings:
    return TrackingSettings(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                            artifact_location=cfg.tracking.artifact_location)


def execute_stage(stage: str, module: ModuleType, cfg: DictConfig, out_dir: Optional[Path] = None,
                  parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                  extra_tags: Optional[dict[str, str]] = None) -> dict:
    """Run one stage under the contract and return its manifest."""
    started = time.time()
    outputs_dir = Path(cfg.paths.outputs_dir)
    final_dir = Path(out_dir) if out_dir else stage_dir(outputs_dir, cfg.name, stage)
    sections = {key: OmegaConf.to_container(cfg[key], resolve=True, enum_to_str=True)
                if OmegaConf.is_config(cfg[key]) else cfg[key] for key in module.SECTIONS}
    inputs = {name: read_upstream(outputs_dir, cfg.name, name) for name in module.upstream(cfg)}
    chash = config_hash({"config": sections, "inputs": {n: u.hash for n, u in inputs.items()}})
    commit = git_commit()
    tags = {"stage": stage, "config_hash": chash, "git_commit": commit, "mlflow.source.git.commit": commit,
            **{f"upstream.{n}.run_id": u.run_id or "" for n, u in inputs.items()}, **(extra_tags or {})}
    # Signals wait while the output is swapped in and the run is closed, so the published
    # manifest and the run's status always agree; a pending SIGTERM is acted on right after.
    deferred = False
    try:
        with stage_lock(final_dir, stage), \
                stage_run(tracking_settings(cfg), run_name=run_name or stage, tags=tags,
                          params=flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)),
                          parent_run_id=parent_run_id) as run:
            run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            with building(final_dir) as build_dir:
                ctx = StageContext(build_dir=build_dir, inputs=inputs, run=run, cache_dir=Path(cfg.paths.cache_dir))
                result = module.run(cfg, ctx)
                run.log_metrics(result.metrics)
                manifest = {
                    "stage": stage,
                    "experiment": cfg.name,
                    "config_hash": chash,
                    "config": sections,
                    "inputs": {n: {"dir": str(u.dir), "manifest_sha256": u.hash, "mlflow_run_id": u.run_id}
                               for n, u in inputs.items()},
                    "counts": result.counts,
                    "metrics": result.metrics,
                    "outputs": result.outputs,
                    "mlflow_run_id": run.run_id,
                    "git_commit": commit,
                    "wall_time_s": round(time.time() - started, 3),
                    "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                run.log_dict(manifest, MANIFEST)
                write_manifest(build_dir, manifest)
                signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING)
                deferred = True
    finally:
        if deferred:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINATING)
    return manifest
