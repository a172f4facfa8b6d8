"""Lineage in MLflow's own terms: stage outputs as MLflow datasets, trained models as logged and registered models.

Every stage run logs each upstream output it read as a dataset input (context ``input``) and its own output as
one with context ``output`` (MLflow 3 records datasets only as run inputs; the context tag says which way they
flow). A dataset is named after the stage that wrote it; its digest is the start of the sha256 of that stage's
manifest.json, the same hash the downstream manifest records, so the output of one run and the input of the
next are the same dataset in the store. Training stages with a transformers export also log it as an MLflow
model and register it: one registered model per experiment, a version per run, an alias per stage.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

DIGEST_CHARS = 16  # of the manifest's sha256 (MLflow keeps at most 36 characters)
CONTEXT = "mlflow.data.context"

# Arrow type names -> MLflow column types (other columns, lists and structs, are left out of the schema)
ARROW_TO_MLFLOW = {"string": "string", "large_string": "string", "int64": "long", "int32": "integer",
                   "int16": "integer", "int8": "integer", "uint8": "integer", "uint16": "integer",
                   "uint32": "long", "double": "double", "float": "float", "bool": "boolean",
                   "binary": "binary", "large_binary": "binary"}


@dataclass
class StageData:
    """A stage's output as a dataset: its name (the stage), folder, manifest and manifest hash."""

    stage: str
    directory: Path  # where it is published (the dataset's source)
    manifest: dict
    sha256: str
    files_dir: Optional[Path] = None  # where its files are now, when not yet published (the build folder)

    @property
    def digest(self) -> str:
        return self.sha256[:DIGEST_CHARS]


def parquet_schema(files_dir: Path, outputs: Mapping[str, Any]) -> Optional[dict]:
    """MLflow's column schema of the kept documents' Parquet files, when the stage wrote any."""
    import pyarrow.parquet as pq

    kept = outputs.get("kept")
    patterns = kept if isinstance(kept, list) else [kept] if isinstance(kept, str) else []
    files = sorted(p for pattern in patterns for p in Path(files_dir).glob(pattern))
    if not files:
        return None
    columns = [{"name": f.name, "type": ARROW_TO_MLFLOW[str(f.type)], "required": not f.nullable}
               for f in pq.read_schema(files[0]) if str(f.type) in ARROW_TO_MLFLOW]
    return {"mlflow_colspec": columns}


def profile(manifest: dict) -> dict[str, Any]:
    """The sizes a user would want beside the dataset's name: documents, tokens, parameters."""
    counts, metrics, outputs = manifest.get("counts", {}), manifest.get("metrics", {}), manifest.get("outputs", {})
    found = {"documents": counts.get("kept"), "rejected": counts.get("rejected", counts.get("removed")),
             "train_tokens": (counts.get("train") or {}).get("tokens"),
             "val_tokens": (counts.get("val") or {}).get("tokens"),
             "parameters": metrics.get("model/params", metrics.get("merge/params")),
             "tokens_trained": metrics.get("train/tokens"),
             "files": sorted(k for k in ("kept", "shards", "model", "adapter", "hf") if k in outputs) or None}
    return {k: v for k, v in found.items() if v is not None}


def dataset_input(data: StageData, context: str):
    from mlflow.entities import Dataset, DatasetInput, InputTag

    schema = parquet_schema(data.files_dir or data.directory, data.manifest.get("outputs", {}))
    dataset = Dataset(name=data.stage, digest=data.digest, source_type="local",
                      source=json.dumps({"uri": Path(data.directory).resolve().as_uri()}),
                      schema=json.dumps(schema) if schema else None, profile=json.dumps(profile(data.manifest)))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=CONTEXT, value=context)])


def named_paths(config: Any, prefix: str = "") -> dict[str, tuple[str, Optional[str]]]:
    """The files a stage's config names: every ``path`` or ``*_path`` key with a value (a source's ``path``, an
    evaluation task's, ``init.path``), by its dotted key without ``.path``, with the entry's ``license``."""
    found = {}
    if isinstance(config, Mapping):
        for key, value in config.items():
            key = str(key)
            name = f"{prefix}{key}"
            if (key == "path" or key.endswith("_path")) and isinstance(value, str) and value:
                found[name[:-len(".path")] if key == "path" else name] = (value, config.get("license"))
            elif isinstance(value, Mapping):
                found.update(named_paths(value, f"{name}."))
    return found


def files_of(path: str) -> list[Path]:
    """The files a path names: a file, every file under a directory, or a glob's matches (``**`` recursive)."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    return sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())


def file_input(name: str, path: str, license: Optional[str]):
    """A dataset input for files the config names; its digest hashes their names, sizes and modification times
    (not their bytes: a crawl is too large to read twice), so a changed or added file changes it."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    files = files_of(path)
    stats = [(str(f), f.stat()) for f in files]
    digest = hashlib.sha256("\n".join(f"{f}:{s.st_size}:{s.st_mtime_ns}" for f, s in stats).encode()).hexdigest()
    profile = {"files": len(files), "bytes": sum(s.st_size for _, s in stats), "license": license or "not stated"}
    dataset = Dataset(name=name, digest=digest[:DIGEST_CHARS], source_type="local",
                      source=json.dumps({"uri": path}), profile=json.dumps(profile))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=CONTEXT, value="input")])


def log_datasets(client, run_id: str, inputs: list[StageData], output: StageData,
                 config: Optional[Mapping[str, Any]] = None) -> None:
    """The run's upstream outputs and the files its config names (context ``input``), and its own output
    (context ``output``)."""
    files = [file_input(name, path, license) for name, (path, license) in named_paths(config or {}).items()]
    client.log_inputs(run_id, datasets=[*(dataset_input(d, "input") for d in inputs), *files,
                                        dataset_input(output, "output")])


@contextmanager
def fluent_store(uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``uri`` and ``experiment_id`` for the block, then put back as it was.

    ``mlflow.transformers.log_model`` has no client form; ``set_tracking_uri`` and ``set_experiment`` also write
    MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID into the environment, which the next config composed in this
    process (or a subprocess) would read as its store.
    """
    import mlflow
    from mlflow.tracking import _tracking_service, fluent

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    saved = (_tracking_service.utils._tracking_uri, fluent._active_experiment_id)
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        _tracking_service.utils._tracking_uri, fluent._active_experiment_id = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def export_mb(hf_dir: Path) -> float:
    return sum(f.stat().st_size for f in Path(hf_dir).rglob("*") if f.is_file()) / 1e6


def log_model(settings, run_id: str, stage: str, hf_dir: Path, card: Optional[str]) -> dict[str, Any]:
    """Log the transformers export at ``hf_dir`` as the run's MLflow model and register a version of it.

    Returns what the manifest records: the registered name, version, the alias ``set_alias`` gives it once the
    stage's output is published, and the URIs that load it.
    """
    import mlflow
    import mlflow.transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = mlflow.MlflowClient(settings.uri)
    components = {"model": AutoModelForCausalLM.from_pretrained(hf_dir), "tokenizer": AutoTokenizer.from_pretrained(hf_dir)}
    model_card = None
    if card is not None:
        from huggingface_hub import ModelCard

        model_card = ModelCard(card)  # ours, so MLflow asks no hub for one
    name = settings.registered_model
    with fluent_store(settings.uri, client.get_run(run_id).info.experiment_id):
        info = mlflow.transformers.log_model(
            transformers_model=components, name="model", task="text-generation", run_id=run_id, model_card=model_card,
            registered_model_name=name, pip_requirements=_requirements(), tags={"stage": stage})
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "stage", stage)
    return {"name": name, "version": version, "alias": stage, "uri": f"models:/{name}/{version}",
            "model_id": info.model_id}


def set_alias(settings, registered: Mapping[str, str]) -> None:
    """Point the stage's alias at the version its now-published output registered."""
    from mlflow.tracking import MlflowClient

    MlflowClient(settings.uri).set_registered_model_alias(registered["name"], registered["alias"], registered["version"])


def _requirements() -> list[str]:
    """What loading the model needs, pinned to what logged it (inferring them imports the model again)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "tokenizers", "safetensors")]
