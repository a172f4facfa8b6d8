"""The stage contract: declared inputs, build aside then rename, manifest last, one tracked run.

A stage module provides
    SECTIONS  the top-level config sections that define its output (hashed, so a change rebuilds it),
    RUNTIME   optionally, sections it reads that say how it runs, not what it computes (not hashed:
              trainer, so a run killed on one device count resumes on another),
    upstream(cfg) -> list of upstream stage names it reads,
    run(cfg, ctx) -> StageResult, writing only into ctx.build_dir,
    RESUMABLE = True, optionally: it checkpoints into ctx.checkpoint_dir, which outlives a failed or killed
              execution; the next execution with the same config hash resumes there, in the same MLflow run.
    fingerprint(cfg) -> {path: sha256}, optionally: the files the config names whose contents define the output
              (word lists), hashed with the config and written to the manifest.
``ctx.published`` is the output this build will replace (of any config), for a stage that can reuse it.
``cfg`` is a ``StageConfig``: the typed sections named in SECTIONS and RUNTIME and nothing else, so a
stage cannot read a key its config hash does not account for.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Optional

from omegaconf import OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.config import RootConfig, as_plain
from pipeline.errors import BadInput, MissingUpstream, PipelineError, shown_path
from pipeline.files import file_hash
from pipeline.model.checkpoints import checkpoint_dir_for
from pipeline.tracking import StageRun, TrackingSettings, client_for, end_if_running, flatten, stage_run
from pipeline.tracking.lineage import StageData, export_mb, log_datasets, log_model, set_alias

if TYPE_CHECKING:
    from pipeline.tracking.energy import EnergyMeter, EnergyReading

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
    checkpoint_dir: Optional[Path] = None  # resumable stages: survives a kill, removed after success
    published: Optional[Path] = None  # the stage's current output (any config), which this build will replace
    resumed: bool = False  # the MLflow run and checkpoints come from an earlier, interrupted execution
    rank: int = 0  # a distributed job's other ranks run the stage with a scratch build_dir and no tracking

    @property
    def input_dirs(self) -> dict[str, Path]:
        """Each upstream stage's output directory, by stage name."""
        return {name: upstream.dir for name, upstream in self.inputs.items()}


@dataclass
class StageResult:
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)  # stage-specific index of what it wrote
    step: int = 0  # the MLflow step of ``metrics`` (a training stage's last step)
    warnings: list[str] = field(default_factory=list)  # what a user should know of a run that succeeded


class StageConfig:
    """The sections of the run's config that a stage declared in SECTIONS, as attributes."""

    def __init__(self, stage: str, root: RootConfig, sections: tuple[str, ...]):
        self._stage = stage
        for key in sections:
            setattr(self, key, getattr(root, key))

    def __getattr__(self, name: str):
        raise AttributeError(f"the {self._stage} stage reads config section '{name}' but does not list it in its "
                             f"SECTIONS (or RUNTIME), so its config hash would not account for it")


def stage_config(stage: str, module: ModuleType, root: RootConfig) -> StageConfig:
    return StageConfig(stage, root, (*module.SECTIONS, *getattr(module, "RUNTIME", ())))


def stage_dir(outputs_dir: Path, experiment: str, stage: str) -> Path:
    return Path(outputs_dir) / experiment / stage


def read_upstream(outputs_dir: Path, experiment: str, stage: str) -> Upstream:
    directory = stage_dir(outputs_dir, experiment, stage)
    path = directory / MANIFEST
    if not path.is_file():
        exp = "" if experiment == "demo" else f" EXP={experiment}"
        raise MissingUpstream(f"{shown_path(path)} is missing: run 'make {stage}{exp}' first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{shown_path(path)} is not valid JSON ({e.msg}): run 'make -B {stage}' to rebuild it") from e
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
            raise PipelineError(f"another {stage} run is writing {shown_path(final_dir)}; wait for it to finish") from None
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


def write_json(path: Path, data: dict) -> Path:
    """Write aside, then rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_manifest(directory: Path, manifest: dict) -> Path:
    return write_json(Path(directory) / MANIFEST, manifest)


RESUME_STATE = "run.json"


def resumable_run(ckpt_dir: Path, chash: str) -> tuple[Optional[str], Optional[str]]:
    """(the MLflow run id to resume in ``ckpt_dir`` or None, the run id of checkpoints of another config or None).

    Checkpoints of another config are kept: they move to ``<stage>.ckpt-<its hash>`` (beside the folder a
    symlinked ``<stage>.ckpt`` points to, so they stay on its filesystem and the link stays). Running that
    config again moves them back and resumes its run.
    """
    real = ckpt_dir.resolve() if ckpt_dir.is_symlink() else ckpt_dir
    state = _resume_state(real)
    if state is not None and state.get("config_hash") == chash:
        return state["mlflow_run_id"], None
    superseded = None
    if state is not None:
        old = state.get("config_hash")
        aside = real.with_name(f"{real.name}-{old}")
        n = 1
        while aside.exists():
            n += 1
            aside = real.with_name(f"{real.name}-{old}.{n}")
        os.rename(real, aside)
        print(f"{shown_path(ckpt_dir)} held the checkpoints of another config ({old}); kept them at {shown_path(aside)}, "
              f"where running that config again resumes them", flush=True)
        superseded = state.get("mlflow_run_id")
    kept = real.with_name(f"{real.name}-{chash}")
    state = _resume_state(kept)
    if state is None or (real.exists() and any(real.iterdir())):
        return None, superseded
    if real.exists():
        real.rmdir()
    os.rename(kept, real)
    print(f"{shown_path(kept)} holds this config's checkpoints, set aside when the config changed; moved them back",
          flush=True)
    return state["mlflow_run_id"], superseded


def _resume_state(directory: Path) -> Optional[dict]:
    path = directory / RESUME_STATE
    return json.loads(path.read_text()) if path.is_file() else None


def remove_checkpoints(ckpt_dir: Path) -> None:
    """Remove a finished run's checkpoint directory; a symlink to one elsewhere is emptied and kept."""
    if ckpt_dir.is_symlink():
        for child in ckpt_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    else:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def distributed_rank() -> int:
    """This process's global rank when Lightning, torchrun or SLURM (srun, submitit: a task per device) launched
    it as one of several, else 0."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    local, node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("NODE_RANK", 0))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return node * per_node + local


class NullRun:
    """The tracking of a non-zero rank: rank 0 logs for the whole job."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def execute_worker_rank(module: ModuleType, cfg: RootConfig, section: StageConfig, final_dir: Path,
                        rank: int) -> None:
    """Run a stage as rank ``rank`` of a distributed job: same inputs and checkpoints, no outputs of its own."""
    import tempfile

    outputs_dir = Path(cfg.paths.outputs_dir)
    inputs = {name: read_upstream(outputs_dir, cfg.name, name) for name in module.upstream(section)}
    with tempfile.TemporaryDirectory(prefix=f"rank{rank}-") as scratch:
        ctx = StageContext(build_dir=Path(scratch), inputs=inputs, run=NullRun(), cache_dir=Path(cfg.paths.cache_dir),
                           checkpoint_dir=checkpoint_dir_for(final_dir), rank=rank)
        module.run(section, ctx)


def complete_output(final_dir: Path, chash: str, settings: TrackingSettings, parent_run_id: Optional[str]) -> Optional[dict]:
    """The manifest in ``final_dir`` if it is complete with config hash ``chash`` and its run is a child of
    ``parent_run_id`` (a resumed sweep's), else None: an output another sweep left there is rebuilt, so that every
    job of a sweep is a child of its parent run."""
    from mlflow.exceptions import MlflowException

    if not (final_dir / MANIFEST).is_file():
        return None
    done = json.loads((final_dir / MANIFEST).read_text())
    if done.get("config_hash") != chash or not done.get("mlflow_run_id"):
        return None
    try:
        run = client_for(settings).get_run(done["mlflow_run_id"])
    except MlflowException:  # its run is gone (another store, or deleted)
        return None
    return done if run.data.tags.get("mlflow.parentRunId") == parent_run_id else None


def execute_stage(stage: str, module: ModuleType, cfg: RootConfig, out_dir: Optional[Path] = None,
                  parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                  extra_tags: Optional[dict[str, str]] = None, skip_complete: bool = False) -> dict:
    """Run one stage under the contract and return its manifest.

    ``skip_complete`` (a sweep's jobs): an output already complete with this config hash, made by a run of the same
    sweep (``parent_run_id``), is kept and its manifest returned with ``skipped`` set, nothing run or logged."""
    started = time.time()
    section = stage_config(stage, module, cfg)
    outputs_dir = Path(cfg.paths.outputs_dir)
    final_dir = Path(out_dir) if out_dir else stage_dir(outputs_dir, cfg.name, stage)
    sections = {key: as_plain(getattr(cfg, key)) for key in module.SECTIONS}
    inputs = {name: read_upstream(outputs_dir, cfg.name, name) for name in module.upstream(section)}
    files = module.fingerprint(section) if hasattr(module, "fingerprint") else {}
    chash = config_hash({"config": sections, "inputs": {n: u.hash for n, u in inputs.items()},
                         **({"files": files} if files else {})})
    done = complete_output(final_dir, chash, cfg.tracking, parent_run_id) if skip_complete else None
    if done is not None:  # every rank of a distributed job skips alike
        print(f"{stage}: {shown_path(final_dir)} is complete with this config ({chash}): skipped (MLflow run "
              f"{done.get('mlflow_run_id')})", file=sys.stderr, flush=True)
        return {**done, "skipped": True}
    rank = distributed_rank()
    if rank:
        execute_worker_rank(module, cfg, section, final_dir, rank)
        return {}
    commit = git_commit()
    tags = {"stage": stage, "config_hash": chash, "git_commit": commit, "mlflow.source.git.commit": commit,
            **{f"upstream.{n}.run_id": u.run_id or "" for n, u in inputs.items()}, **(extra_tags or {})}
    resumable = getattr(module, "RESUMABLE", False)
    ckpt_dir = checkpoint_dir_for(final_dir) if resumable else None
    # Signals wait while the output is swapped in and the run is closed, so the published
    # manifest and the run's status always agree; a pending SIGTERM is acted on right after.
    deferred = False
    try:
        with stage_lock(final_dir, stage):
            resume_id, superseded = resumable_run(ckpt_dir, chash) if resumable else (None, None)
            if superseded:  # killed by SIGKILL, it was never closed
                end_if_running(cfg.tracking, superseded, "KILLED")
            with stage_run(cfg.tracking, run_name=run_name or stage, tags=tags,
                           params=flatten(as_plain(cfg)),
                           parent_run_id=parent_run_id, resume_run_id=resume_id) as run:
                if resumable:
                    (ckpt_dir.resolve() if ckpt_dir.is_symlink() else ckpt_dir).mkdir(parents=True, exist_ok=True)
                    write_json(ckpt_dir / RESUME_STATE, {"mlflow_run_id": run.run_id, "config_hash": chash})
                if resume_id:
                    print(f"{stage}: resuming MLflow run {resume_id} from {shown_path(ckpt_dir)}", flush=True)
                else:
                    run.log_text(OmegaConf.to_yaml(as_plain(cfg)), "config.yaml")
                deferred = True  # _build blocks signals once the record is written
                _build(stage, module, cfg, section, final_dir, inputs, run, ckpt_dir, resume_id is not None, chash, commit,
                       started, sections, files, register=parent_run_id is None)  # a sweep's jobs register no model
            if resumable:
                remove_checkpoints(ckpt_dir)
    finally:
        if deferred:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINATING)
    return json.loads((final_dir / MANIFEST).read_text())


def _build(stage: str, module: ModuleType, cfg: RootConfig, section: StageConfig, final_dir: Path, inputs: dict[str, Upstream],
           run: StageRun, ckpt_dir: Optional[Path], resumed: bool, chash: str, commit: str, started: float,
           sections: dict, files: dict, register: bool = True) -> None:
    """Run the stage into a build directory, write its manifest and record last, then block signals for the swap."""
    with building(final_dir) as build_dir:
        ctx = StageContext(build_dir=build_dir, inputs=inputs, run=run, cache_dir=Path(cfg.paths.cache_dir),
                           checkpoint_dir=ckpt_dir, resumed=resumed,
                           published=final_dir if (final_dir / MANIFEST).is_file() else None)
        result, energy = _metered(module, section, ctx, cfg.tracking)
        run.log_metrics(result.metrics, step=result.step)
        if energy:
            run.log_metrics(energy.metrics(), step=result.step)
            run.set_tags(energy.tags())
        for warning in result.warnings:
            print(f"{stage}: warning: {warning}", file=sys.stderr, flush=True)
        if result.warnings:
            run.set_tags({"warnings": "; ".join(result.warnings)})
        manifest = {
            "stage": stage,
            "experiment": cfg.name,
            "config_hash": chash,
            "config": sections,
            **({"files": files} if files else {}),
            "inputs": {n: {"dir": str(u.dir), "manifest_sha256": u.hash, "mlflow_run_id": u.run_id}
                       for n, u in inputs.items()},
            "counts": result.counts,
            "metrics": result.metrics,
            "outputs": result.outputs,
            "warnings": result.warnings,
            "energy": energy.as_dict() if energy else None,
            "mlflow_run_id": run.run_id,
            "git_commit": commit,
            "wall_time_s": round(time.time() - started, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        recording = time.time()
        _record(stage, cfg.tracking, run, manifest, build_dir, inputs, register)
        run.log_dict(manifest, MANIFEST)
        write_manifest(build_dir, manifest)
        if cfg.tracking.lineage:
            log_datasets(run.client, run.run_id, [StageData(n, u.dir, u.manifest, u.hash) for n, u in inputs.items()],
                         StageData(stage, final_dir, manifest, file_hash(build_dir / MANIFEST), files_dir=build_dir),
                         {stage: sections[stage]} if stage in sections else None)  # the files its own section names
        run.log_metrics({"record/seconds": time.time() - recording}, step=result.step)
        signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING)
    if manifest.get("registered_model"):  # published: the stage's alias may now point at it
        try:
            set_alias(cfg.tracking, manifest["registered_model"])
        except Exception as e:  # noqa: BLE001 - the output is in place; say what is missing
            print(f"{stage}: warning: could not set alias '{manifest['registered_model']['alias']}' on model "
                  f"{manifest['registered_model']['uri']}: {str(e).splitlines()[0][:300]}", file=sys.stderr, flush=True)


def start_meter(settings: TrackingSettings) -> Optional[EnergyMeter]:
    """codecarbon's tracker for this execution, or None with ``tracking.energy`` off (codecarbon never imported)."""
    if not settings.energy:
        return None
    from pipeline.tracking.energy import EnergyMeter

    return EnergyMeter(settings.energy_country, settings.energy_region, settings.carbon_intensity)


def _metered(module: ModuleType, section: StageConfig, ctx: StageContext,
             settings: TrackingSettings) -> tuple[StageResult, Optional[EnergyReading]]:
    """Run the stage with its energy measured. The reading covers every execution of a resumed run (the earlier
    ones' as their runs logged it); an execution that fails or is killed logs what it measured before it ends."""
    earlier = ctx.run.logged_metrics("energy/") if ctx.resumed and settings.energy else {}
    meter = None
    try:
        meter = start_meter(settings)
        result = module.run(section, ctx)
    except BaseException:
        reading = meter.stop() if meter else None
        if reading:  # best effort: the run is about to end FAILED or KILLED
            try:
                ctx.run.log_metrics(reading.plus(earlier).metrics(), always=True)
            except Exception:  # noqa: BLE001 - the stage's own error matters more
                pass
        raise
    reading = meter.stop() if meter else None
    return result, reading.plus(earlier) if reading else None


def _record(stage: str, settings: TrackingSettings, run: StageRun, manifest: dict, build_dir: Path,
            inputs: dict[str, Upstream], register: bool = True) -> None:
    """The stage's card, and a training stage's transformers export logged and registered as an MLflow model."""
    from pipeline.tracking.cards import write_card

    card = write_card(stage, manifest, build_dir, {n: u.manifest for n, u in inputs.items()})
    if card:
        manifest["outputs"]["card"] = card
        run.log_artifact(build_dir / card, str(Path(card).parent) if Path(card).parent != Path(".") else None)
    hf = manifest["outputs"].get("hf")
    if not (settings.models and hf and register):
        return
    size = export_mb(build_dir / hf)
    if size > settings.max_model_mb:  # the weights would travel through the tracking server
        note = (f"the export ({size:,.0f} MB) is not logged as an MLflow model: over tracking.max_model_mb "
                f"({settings.max_model_mb:,.0f}); it stays in {hf}/")
        print(f"{stage}: warning: {note}", file=sys.stderr, flush=True)
        manifest["warnings"].append(note)
        return
    card_text = (build_dir / card).read_text() if card and Path(card).parent == Path(hf) else None
    manifest["registered_model"] = log_model(settings, run.run_id, stage, build_dir / hf, card_text)
