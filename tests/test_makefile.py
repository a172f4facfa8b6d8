"""The Makefile: help, the commands `make all` runs, and nothing runs twice."""
from __future__ import annotations

import subprocess

import pytest

from pipeline import PROJECT_ROOT
from pipeline.stages import STAGES, TOOLS
from tests.conftest import mlflow_runs, tiny_tokenize_overrides


def make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["make", "--no-print-directory", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_help_is_the_default_goal_and_lists_every_stage():
    proc = make()
    assert proc.returncode == 0
    for target in ["setup", "test", "all", "clean", "mlflow-ui", "mlflow-server", "bench", "sweep", *STAGES, *TOOLS]:
        assert f"  {target} " in proc.stdout, target


def test_make_n_all_lists_one_command_per_stage(tmp_path):
    proc = make("-n", "all", f"OUTPUTS={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if " -m pipeline " in line]
    # scaling fits a sweep (make sweep; make scaling), which `make all` does not run
    assert [c.split(" -m pipeline ")[1].split()[0] for c in commands] == [s for s in STAGES if s != "scaling"]
    assert all(f"experiment=demo paths.outputs_dir={tmp_path}" in c for c in commands)

    proc = make("-n", "all", "EXP=demo", "ARGS=tokenizer.vocab_size=512 seed=3", f"OUTPUTS={tmp_path}")
    assert "-m pipeline tokenize experiment=demo" in proc.stdout and "tokenizer.vocab_size=512 seed=3" in proc.stdout


@pytest.mark.slow
def test_make_tokenize_twice_runs_the_stages_once(tmp_path, data_dir, tracking_uri, experiment):
    # What Make runs is the point, not the data: the filter reads only the 20 CCNet documents, dedup skips its
    # precision/recall measurement, tokenize reads the tiny corpus.
    small = ["~filter.sources.warc", "~filter.sources.html", "dedup.eval.enabled=false"]
    args = " ".join([*small, *tiny_tokenize_overrides(data_dir), "tokenizer.vocab_size=512",
                     f"tracking.experiment={experiment}"])
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    first = make("tokenize", f"OUTPUTS={tmp_path}", f"ARGS={args}", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "-m pipeline filter" in first.stdout and "-m pipeline dedup" in first.stdout  # upstream stages first
    assert (tmp_path / "demo" / "filter" / "manifest.json").is_file()
    assert (tmp_path / "demo" / "dedup" / "manifest.json").is_file()
    assert (tmp_path / "demo" / "tokenize" / "manifest.json").is_file()
    second = make("tokenize", f"OUTPUTS={tmp_path}", f"ARGS={args}", env=env)
    assert second.returncode == 0 and "-m pipeline" not in second.stdout
    runs = mlflow_runs(tracking_uri, experiment)
    assert sorted((r.data.tags["stage"], r.info.status) for r in runs) == [("dedup", "FINISHED"),
                                                                           ("filter", "FINISHED"),
                                                                           ("tokenize", "FINISHED")]
    # changed overrides are a changed input: the stage runs again (each stage has its own ARGS stamp)
    third = make("filter", f"OUTPUTS={tmp_path}", f"ARGS={args} tokenizer.vocab_size=600", env=env)
    assert third.returncode == 0 and "-m pipeline filter" in third.stdout
    assert len(mlflow_runs(tracking_uri, experiment)) == 4


def test_make_sweep_names_its_launcher_and_adds_the_server_for_jobs_side_by_side(tmp_path):
    def sweep_command(*args: str) -> str:
        proc = make("-n", "sweep", f"OUTPUTS={tmp_path}", *args)
        assert proc.returncode == 0, proc.stderr
        (command,) = [line for line in proc.stdout.splitlines() if " -m pipeline pretrain -m " in line]
        return " ".join(command.split())

    assert "+sweep=demo hydra/launcher=basic experiment=demo" in sweep_command()
    assert "+sweep=demo hydra/launcher=joblib tracking=server hydra.launcher.n_jobs=2 experiment=demo" in \
        sweep_command("LAUNCHER=joblib", "JOBS=2")
    assert "hydra/launcher=slurm tracking=server experiment=demo" in sweep_command("LAUNCHER=slurm", "JOBS=2")


def test_inspect_filter_without_output_names_the_target(tmp_path):
    proc = make("inspect-filter", f"OUTPUTS={tmp_path}")
    assert proc.returncode != 0 and "run 'make filter' first" in proc.stderr


def test_help_shows_values_not_variable_names():
    proc = make("help")
    assert "$(" not in proc.stdout and "torch==" in proc.stdout


def test_a_fresh_clone_sets_itself_up_before_the_tests_and_the_demo(tmp_path):
    """`make test` and `make all` on a machine without .venv install it first (two commands, not three)."""
    venv = tmp_path / "venv"
    for target in ("test", "all"):
        proc = make("-n", target, f"VENV={venv}", f"OUTPUTS={tmp_path / 'out'}")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        install = next(i for i, line in enumerate(lines) if "pip install -e '.[dev]'" in line)
        first_python = next(i for i, line in enumerate(lines) if f"{venv}/bin/python -m p" in line)
        assert install < first_python and f"touch {venv}/.installed" in proc.stdout
    # with the environment in place (this checkout's), nothing is installed again
    proc = make("-n", "test")
    assert "pip install" not in proc.stdout and "-m pytest --runslow -q" in proc.stdout


def _outputs_with_a_store(root):
    """An outputs/ folder as runs leave it: two experiments, the MLflow store, its artifacts and the cache; and a
    folder beside the project that a path escaping outputs/ would reach. Everything lies under ``root``."""
    outputs = root / "project" / "outputs"
    for exp in ("demo", "other"):
        (outputs / exp / "logs" / "tokenize").mkdir(parents=True)
        (outputs / exp / "tokenize").mkdir()
        (outputs / exp / "tokenize" / "manifest.json").write_text("{}")
    (outputs / "mlflow.db").write_text("the store")
    (outputs / "mlartifacts" / "1").mkdir(parents=True)
    (outputs / "cache" / "datasets").mkdir(parents=True)
    for victim in (root / "victim", root / "project" / "victim"):
        victim.mkdir()
        (victim / "keep.txt").write_text("not the pipeline's")
    return outputs


def _tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_clean_removes_one_experiment_folder_and_keeps_the_store(tmp_path):
    outputs = _outputs_with_a_store(tmp_path)
    before = _tree(tmp_path)
    proc = make("clean", "EXP=demo", f"OUTPUTS={outputs}")
    assert proc.returncode == 0, proc.stderr
    assert not (outputs / "demo").exists()
    assert _tree(tmp_path) == {p for p in before if not p.startswith("project/outputs/demo")}


@pytest.mark.parametrize("exp", ["", ".", "..", "../victim", "../../victim", "demo/..", "demo/../..", "*", "demo*",
                                 "{victim}", "demo {victim}", "cache", "mlartifacts", "missing", "demo/tokenize"])
def test_clean_refuses_anything_but_one_experiment_folder(tmp_path, exp):
    """Each of these removed the store, outputs/ or a folder outside the project (all within tmp_path here)."""
    outputs = _outputs_with_a_store(tmp_path)
    before = _tree(tmp_path)
    proc = make("clean", f"EXP={exp.format(victim=tmp_path / 'victim')}", f"OUTPUTS={outputs}")
    assert proc.returncode != 0, proc.stdout
    assert "make clean: " in proc.stderr and "nothing removed" in proc.stderr, proc.stderr[-2000:]
    assert _tree(tmp_path) == before, "nothing is deleted"
