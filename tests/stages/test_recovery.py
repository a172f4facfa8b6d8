"""A training stage after the failures users meet: a late failure, a truncated checkpoint, a changed config
after a SIGKILL, a checkpoint folder on another filesystem, a full disk. Nothing trained is thrown away."""
from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.contract import execute_stage
from pipeline.model.gpt import load_model
from pipeline.stages import load_stage
from tests.conftest import mlflow_runs, tmpfs
from tests.stages.test_pretrain import _cli, _compose, outputs  # noqa: F401  (outputs: the shared tokenize fixture)

pytestmark = pytest.mark.slow


def _steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    return [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


def _link_tokenize(outputs: Path, root: Path) -> None:
    """``root``/demo/tokenize: the module's shared tokenize output."""
    (root / "demo").mkdir(parents=True, exist_ok=True)
    os.symlink(outputs / "demo" / "tokenize", root / "demo" / "tokenize")


def test_a_failure_while_publishing_keeps_the_training_and_a_rerun_only_publishes(outputs, tracking_uri,
                                                                                   experiment, data_dir, monkeypatch,
                                                                                   capsys):
    cfg = _compose(outputs, tracking_uri, experiment, data_dir)
    out = outputs / "late" / "pretrain"
    ckpt_dir = out.with_name("pretrain.ckpt")

    def disk_full(*args, **kwargs):  # the disk fills while hf/ is written, after the checkpoints were published
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "hf" / "model.safetensors"))

    monkeypatch.setattr("pipeline.model.export.export_transformers", disk_full)
    with pytest.raises(OSError, match="No space left"):
        execute_stage("pretrain", load_stage("pretrain"), cfg, out_dir=out)
    trained = {p.name: p.stat().st_ino for p in ckpt_dir.glob("step-*.ckpt")}
    assert sorted(trained) == ["step-000020.ckpt", "step-000030.ckpt"], "the trained checkpoints outlive the failure"
    (failed,) = mlflow_runs(tracking_uri, experiment)
    assert failed.info.status == "FAILED"
    losses = _steps(tracking_uri, failed.info.run_id, "train/loss")

    monkeypatch.undo()
    capsys.readouterr()
    manifest = execute_stage("pretrain", load_stage("pretrain"), cfg, out_dir=out)
    assert f"resuming MLflow run {failed.info.run_id}" in capsys.readouterr().out
    published = {p.name: p.stat().st_ino for p in (out / "checkpoints").iterdir()}
    assert published == trained, "the rerun publishes the same checkpoint files: it did not train again"
    assert (out / "hf" / "config.json").is_file() and manifest["mlflow_run_id"] == failed.info.run_id
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.info.status == "FINISHED"
    assert _steps(tracking_uri, run.info.run_id, "train/loss") == losses, "each step is logged once"
    assert not ckpt_dir.exists()


def test_a_truncated_newest_checkpoint_resumes_from_the_newest_intact_one(outputs, tracking_uri, experiment,
                                                                         data_dir, monkeypatch, capsys):
    cfg = _compose(outputs, tracking_uri, experiment, data_dir)
    out = outputs / "truncated" / "pretrain"
    ckpt_dir = out.with_name("pretrain.ckpt")
    monkeypatch.setattr("pipeline.model.export.export_transformers",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError):
        execute_stage("pretrain", load_stage("pretrain"), cfg, out_dir=out)
    reference = load_model(ckpt_dir / "step-000030.ckpt").state_dict()
    newest = ckpt_dir / "step-000030.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy or a disk cut it short

    monkeypatch.undo()
    capsys.readouterr()
    execute_stage("pretrain", load_stage("pretrain"), cfg, out_dir=out)
    err = capsys.readouterr().err
    assert "step-000030.ckpt is not a whole checkpoint" in err and "using step-000020.ckpt instead" in err
    resumed = load_model(out).state_dict()
    assert all((resumed[k] - reference[k]).abs().max() < 1e-5 for k in reference), "steps 21-30 trained again alike"


def test_a_changed_config_after_a_sigkill_keeps_the_checkpoints_and_ends_the_old_run(outputs, tracking_uri,
                                                                                   data_dir, tmp_path, capsys):
    experiment = f"sigkill-{uuid.uuid4().hex[:6]}"
    root = tmp_path / "out"
    _link_tokenize(outputs, root)
    steps = ["pretrain.max_steps=60", "pretrain.ckpt_every_steps=20", "pretrain.log_every_steps=1",
             "pretrain.sample_every_steps=0", "pretrain.export=false", f"paths.outputs_dir={root}"]
    proc = _cli(outputs, tracking_uri, experiment, data_dir, *steps)
    ckpt_dir = root / "demo" / "pretrain.ckpt"
    try:
        deadline = time.time() + 300
        while not (ckpt_dir / "step-000020.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its step-20 checkpoint"
            time.sleep(0.02)
        (killed,) = mlflow_runs(tracking_uri, experiment)
        while max(_steps(tracking_uri, killed.info.run_id, "train/loss"), default=0) < 23:
            assert proc.poll() is None and time.time() < deadline, "the run ended before step 23"
            time.sleep(0.01)
    finally:
        proc.kill()  # SIGKILL: a few steps past the checkpoint, logged but not saved
        proc.wait(60)
    (killed,) = mlflow_runs(tracking_uri, experiment)
    assert killed.info.status == "RUNNING", "nothing could close it"
    logged = max(_steps(tracking_uri, killed.info.run_id, "train/loss"))
    saved = sorted(p.name for p in ckpt_dir.glob("step-*.ckpt"))

    # The NaN message's advice: lower the learning rate and run again; that is another config.
    capsys.readouterr()
    lowered = _compose(outputs, tracking_uri, experiment, data_dir, *steps, "pretrain.optim.lr=5e-4")
    execute_stage("pretrain", load_stage("pretrain"), lowered)
    said = capsys.readouterr().out
    (aside,) = root.joinpath("demo").glob("pretrain.ckpt-*")
    assert f"kept them at {aside}" in said
    assert sorted(p.name for p in aside.glob("step-*.ckpt")) == saved, "the old config's checkpoints are kept"
    runs = {r.info.run_id: r for r in mlflow_runs(tracking_uri, experiment)}
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert sum(r.info.status == "FINISHED" for r in runs.values()) == 1

    # The old config again: its checkpoints move back and resume its run; the steps it logged are logged once.
    original = _compose(outputs, tracking_uri, experiment, data_dir, *steps)
    manifest = execute_stage("pretrain", load_stage("pretrain"), original)
    assert f"{aside} holds this config's checkpoints" in capsys.readouterr().out and not aside.exists()
    assert manifest["mlflow_run_id"] == killed.info.run_id
    resumed = _steps(tracking_uri, killed.info.run_id, "train/loss")
    assert int(saved[-1][5:11]) < logged, "the kill landed after steps the checkpoint does not hold"
    assert sorted(resumed) == list(range(1, 61)), "every step once"


def test_checkpoints_on_another_filesystem_are_published(outputs, tracking_uri, experiment, data_dir, tmp_path):
    out = tmp_path / "out" / "demo" / "pretrain"
    _link_tokenize(outputs, tmp_path / "out")
    with tmpfs(tmp_path / "elsewhere", "64m") as elsewhere:
        (elsewhere / "ckpt").mkdir()
        os.symlink(elsewhere / "ckpt", out.with_name("pretrain.ckpt"))
        cfg = _compose(outputs, tracking_uri, experiment, data_dir, f"paths.outputs_dir={tmp_path / 'out'}",
                       "pretrain.export=false")
        manifest = execute_stage("pretrain", load_stage("pretrain"), cfg)
        assert manifest["outputs"]["checkpoints"] == ["step-000020.ckpt", "step-000030.ckpt"]
        assert load_model(out / "checkpoints" / "step-000030.ckpt") is not None
        assert out.with_name("pretrain.ckpt").is_symlink() and not list((elsewhere / "ckpt").iterdir()), \
            "the link the user made stays; what it held is gone with the finished run"


def test_a_full_disk_at_a_checkpoint_fails_the_run_in_one_line(outputs, data_dir, tmp_path):
    """The store on the disk that fills (the default layout: outputs/mlflow.db) still records FAILED."""
    experiment = f"full-{uuid.uuid4().hex[:6]}"
    with tmpfs(tmp_path / "small", "3m") as small:
        _link_tokenize(outputs, small)
        uri = f"sqlite:///{small}/mlflow.db"
        proc = _cli(outputs, uri, experiment, data_dir, f"paths.outputs_dir={small}", "pretrain.ckpt_every_steps=1",
                    "pretrain.keep_checkpoints=100", "pretrain.sample_every_steps=0")
        try:
            out = proc.communicate(timeout=600)[0]
        finally:
            proc.kill()  # nothing keeps writing to the filesystem about to be unmounted
        assert proc.returncode == 1, out[-3000:]
        (said,) = [line for line in out.splitlines() if line.startswith("error: ")]
        assert "ENOSPC" in said and "pretrain.ckpt/step-" in said, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert not list((small / "demo" / "pretrain.ckpt").glob("*.tmp")), "a partial checkpoint gives its space back"
        (run,) = mlflow_runs(uri, experiment)
        assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
