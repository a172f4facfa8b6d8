"""Sweeps beyond one process: Hydra's joblib and submitit launchers, an MLflow server for concurrent writers, the
checks made before any job starts, and a killed sweep that resumes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.cli import main as cli_main
from pipeline.config import compose
from pipeline.contract import execute_stage
from pipeline.stages import load_stage
from pipeline.contract import complete_output, write_manifest
from pipeline.errors import PipelineError
from pipeline.sweep import preflight, quoted, still_running, threads_per_job
from pipeline.tracking import TrackingSettings, client_for
from tests.conftest import link_tokenize, mlflow_runs, run_cli, tiny_tokenize_overrides

TINY = ["model=tiny", "model.d_ff=null", "pretrain.micro_batch_size=8", "pretrain.eval_windows=8",
        "pretrain.optim.warmup_steps=2", "pretrain.sample_every_steps=0", "pretrain.export=false",
        "pretrain.log_every_steps=1", "tracking.models=false", "tracking.energy=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tracking_uri) -> str:
    """A real `mlflow server` on a free loopback port, started the way tracking=server starts one (client_for finds
    nobody answering and tracking.server_store set), stopped after the module. Its store is the session's SQLite
    database (tables made once; each test has its own experiment)."""
    home = tmp_path_factory.mktemp("server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    client_for(TrackingSettings(uri=uri, experiment="unused", server_store=tracking_uri,
                                server_artifacts=str(home / "mlartifacts")))
    pid = int((home / f"mlflow-server-{port}.pid").read_text())
    yield uri
    os.killpg(pid, signal.SIGTERM)  # the server runs in its own session, with its workers


def common(tmp_path: Path, experiment: str, data_dir: Path) -> list[str]:
    return [f"paths.outputs_dir={tmp_path}", f"tracking.experiment={experiment}", *tiny_tokenize_overrides(data_dir),
            "tokenizer.vocab_size=512"]


def test_threads_per_job_share_the_cores_between_the_jobs_side_by_side(monkeypatch):
    monkeypatch.setattr("pipeline.sweep.cores", lambda: 8)
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert threads_per_job(OmegaConf.create({"_target_": joblib, "n_jobs": 2})) == 4
    assert threads_per_job(OmegaConf.create({"_target_": joblib, "n_jobs": 3})) == 2
    assert threads_per_job(OmegaConf.create({"_target_": joblib, "n_jobs": -1})) == 1  # all cores: 8 jobs
    assert threads_per_job(OmegaConf.create({"_target_": joblib, "n_jobs": -3})) == 1  # 6 jobs
    assert threads_per_job(OmegaConf.create({"_target_": joblib, "n_jobs": 16})) == 1
    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert threads_per_job(OmegaConf.create({"_target_": local, "cpus_per_task": 3})) == 3
    assert threads_per_job(OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})) \
        is None


@pytest.mark.parametrize("launcher, line", [
    ("ray", "error: hydra/launcher=ray: its plugin is not installed (pip install hydra-ray-launcher); launchers here: "
            "basic, joblib, slurm, submitit_local, submitit_slurm"),
    ("nope", "error: hydra/launcher=nope: no such launcher; launchers here: basic, joblib, slurm, submitit_local, "
             "submitit_slurm"),
])
def test_a_launcher_that_is_not_installed_is_one_line_before_anything_runs(launcher, line, capsys):
    assert cli_main(["pretrain", "-m", f"hydra/launcher={launcher}", "model.d_model=16,32"]) == 2
    assert capsys.readouterr().err.strip() == line


def test_the_slurm_preset_asks_for_one_task_per_device_on_each_node():
    cfg = _hydra_config("hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(".SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 4, 4, "gpu")
    assert launcher.max_num_timeout > 0, "a job that reaches its time limit is requeued (and resumes)"


def _hydra_config(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_jobs_cannot_reach_a_server_on_the_login_nodes_loopback(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")  # as on a login node
    cfg = _hydra_config("hydra/launcher=slurm", "tracking=server")
    with pytest.raises(PipelineError, match=r"runs the jobs on other machines, where http://127.0.0.1:5000 is their own "
                                            r"loopback: .*make mlflow-server MLFLOW_HOST=0.0.0.0"):
        preflight(cfg, OmegaConf.to_object(cfg.tracking))
    cfg = _hydra_config("hydra/launcher=slurm", "tracking=server", "tracking.uri=http://login1:5000")
    preflight(cfg, OmegaConf.to_object(cfg.tracking))  # a server the nodes reach: fine


def test_a_sweep_folder_with_quotes_backslashes_and_dollars_reaches_the_jobs_unchanged():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for folder in ["/data/o'brien/sweep", "/data/a\\b/${x}", "/plain/2026-12-01_05-00-00"]:
        (override,) = OverridesParser.create().parse_overrides([f"hydra.sweep.dir={quoted(folder)}"])
        assert OmegaConf.create({"dir": override.value()}).dir == folder  # as the job's config resolves it


def test_a_sweep_still_running_here_is_not_taken_over():
    import socket

    assert still_running({"sweep_host": socket.gethostname(), "sweep_pid": str(os.getppid())})
    assert not still_running({"sweep_host": socket.gethostname(), "sweep_pid": str(os.getpid())}), "itself"
    assert not still_running({"sweep_host": "elsewhere", "sweep_pid": str(os.getppid())})
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not still_running({"sweep_host": socket.gethostname(), "sweep_pid": str(dead.pid)})


def test_a_complete_output_is_skipped_only_for_the_sweep_that_made_it(tmp_path, tracking_uri, experiment):
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment(experiment)
    parent = client.create_run(exp).info.run_id
    job = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    write_manifest(tmp_path, {"config_hash": "abc", "mlflow_run_id": job})
    settings = TrackingSettings(uri=tracking_uri, experiment=experiment)
    assert complete_output(tmp_path, "abc", settings, parent)["mlflow_run_id"] == job
    assert complete_output(tmp_path, "abd", settings, parent) is None, "another config"
    assert complete_output(tmp_path, "abc", settings, client.create_run(exp).info.run_id) is None, "another sweep"
    assert complete_output(tmp_path / "none", "abc", settings, parent) is None


def test_fsdp_on_cpu_is_refused_when_the_config_loads():
    with pytest.raises(PipelineError, match="config key 'trainer.strategy' is fsdp with accelerator=cpu: FSDP needs "
                                          "CUDA GPUs; on CPUs use trainer=ddp"):
        compose("trainer=fsdp", "trainer.accelerator=cpu")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sqlite", "sbatch", "server down"])
def test_a_sweep_its_launcher_cannot_run_is_refused_before_any_job(case, tmp_path, experiment, data_dir):
    store = tmp_path / "mlflow.db"
    args, env = {
        "sqlite": (["hydra/launcher=joblib", f"tracking.uri=sqlite:///{store}"], {}),
        "sbatch": (["hydra/launcher=slurm", "tracking=server"], {"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"}),
        "server down": (["hydra/launcher=joblib", "tracking=server", f"tracking.uri=http://127.0.0.1:{free_port()}",
                         "tracking.server_store=null"], {}),
    }[case]
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "pretrain", "-m", "model.d_model=16,32", *args,
                           *common(tmp_path, experiment, data_dir)], capture_output=True, text=True, timeout=120,
                          cwd=PROJECT_ROOT, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    expected = {"sqlite": f"hydra/launcher=joblib runs jobs side by side, and the local store sqlite:///{store} takes "
                          f"one writer at a time: add tracking=server",
                "sbatch": "hydra/launcher=slurm submits the jobs with SLURM's sbatch, which is not on this machine's "
                          "PATH",
                "server down": "the MLflow tracking server at http://127.0.0.1:"}[case]
    assert line.startswith("error: pretrain sweep: ") and expected in line, line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "demo" / "multirun").exists(), "no job may start"
    if case == "sqlite":
        assert not store.exists(), "nothing was written to the store"


def _losses(client: MlflowClient, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]


@pytest.mark.slow
def test_eight_joblib_jobs_log_every_point_to_one_server_with_the_losses_of_single_runs(server, tmp_path, experiment,
                                                                                        data_dir, tokenized):
    """8 jobs side by side write to one MLflow server: every metric point arrives, each job's losses are those of
    the same config run alone, and the parent is FINISHED because every child is."""
    link_tokenize(tokenized, tmp_path)
    steps = 8
    proc = run_cli("pretrain", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=8", "seed=1,2,3,4",
                   "model.d_model=16,24", "tracking=server", f"tracking.uri={server}", *TINY,
                   f"pretrain.max_steps={steps}", f"pretrain.eval_every_steps={steps}",
                   *common(tmp_path, experiment, data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep: 8 of 8 jobs finished" in proc.stderr, [l for l in proc.stderr.splitlines() if "sweep:" in l or "error" in l.lower()]

    client = MlflowClient(server)
    runs = mlflow_runs(server, experiment)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8 and {c.info.status for c in children} == {"FINISHED"}
    assert parent.info.status == "FINISHED" and parent.data.tags["launcher"] == "joblib"
    assert parent.data.metrics["sweep/jobs"] == 8 and parent.data.metrics["sweep/failed_jobs"] == 0
    for child in children:  # one point per step of each job: none lost between 8 writers
        assert [m.step for m in sorted(client.get_metric_history(child.info.run_id, "train/loss"),
                                       key=lambda m: m.step)] == list(range(1, steps + 1)), child.info.run_name
        assert len(client.get_metric_history(child.info.run_id, "train/lr")) == steps
    # 8 jobs at once on this machine's cores: one torch thread each where there are at most 15 cores.
    assert {c.data.tags["sweep_job_threads"] for c in children} == {str(max(1, len(os.sched_getaffinity(0)) // 8))}

    sweep = json.loads(next(tmp_path.glob("demo/multirun/pretrain/*/sweep.json")).read_text())
    assert sweep["status"] == "FINISHED" and len(sweep["jobs"]) == 8

    # A job run alone in this process gives the same losses.
    link_tokenize(tokenized, tmp_path / "alone")
    for seed, width in (("4", "24"),):
        (job,) = [c for c in children if (c.data.params["seed"], c.data.params["model.d_model"]) == (seed, width)]
        alone = f"{experiment}-alone-{seed}"
        execute_stage("pretrain", load_stage("pretrain"), compose(
            *TINY, f"seed={seed}", f"model.d_model={width}", f"pretrain.max_steps={steps}",
            f"pretrain.eval_every_steps={steps}", *common(tmp_path / "alone", alone, data_dir), f"tracking.uri={server}"),
            out_dir=tmp_path / "alone" / seed)
        (single,) = mlflow_runs(server, alone)
        assert _losses(client, job.info.run_id) == pytest.approx(_losses(client, single.info.run_id), rel=1e-5)


@pytest.mark.slow
def test_submitit_local_jobs_report_a_failed_job_and_the_others_finish(server, tmp_path, experiment, data_dir,
                                                                       tokenized):
    link_tokenize(tokenized, tmp_path)
    proc = run_cli("pretrain", "-m", "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1",
                   "pretrain.max_steps=6,0", "pretrain.eval_every_steps=6", "tracking=server", f"tracking.uri={server}",
                   *TINY, *common(tmp_path, experiment, data_dir))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "sweep: 1 of 2 jobs finished" in proc.stderr, [l for l in proc.stderr.splitlines() if "sweep" in l]
    assert "sweep: failed job pretrain-1 (pretrain.max_steps=0): error: pretrain: config key 'pretrain.max_steps' is 0" \
        in proc.stderr, proc.stderr[-3000:]
    runs = mlflow_runs(server, experiment)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children["pretrain-0"].info.status == "FINISHED" and children["pretrain-0"].data.tags["sweep_job_threads"] == "1"
    assert parent.info.status == "FAILED", "FINISHED only when every child is"
    assert parent.data.tags["launcher"] == "submitit_local"
    sweep = json.loads(next(tmp_path.glob("demo/multirun/pretrain/*/sweep.json")).read_text())
    assert [j["status"] for j in sweep["jobs"]] == ["COMPLETED", "FAILED"]
    assert list(tmp_path.glob("demo/multirun/pretrain/*/.submitit/*/*_log.out")), "submitit ran the jobs"


@pytest.mark.slow
def test_a_sweep_killed_mid_job_skips_its_complete_jobs_and_resumes_the_killed_one(tmp_path, tracking_uri, experiment,
                                                                                   data_dir, tokenized):
    """Killed in job 1 of 3 and run again: job 0 is skipped (its output complete with the same config hash), job 1
    resumes its MLflow run from its checkpoints, job 2 runs; one parent run, FINISHED, in the same folder."""
    link_tokenize(tokenized, tmp_path)
    args = ["pretrain", "-m", "model.d_model=16,24,32", "pretrain.max_steps=20", "pretrain.ckpt_every_steps=10",
            "pretrain.eval_every_steps=20", *TINY, *common(tmp_path, experiment, data_dir)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list(tmp_path.glob("demo/multirun/pretrain/*/1/pretrain.ckpt/step-000010.ckpt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    (sweep_dir,) = tmp_path.glob("demo/multirun/pretrain/*")
    before = {r.info.run_name: r for r in mlflow_runs(tracking_uri, experiment)}
    assert before["pretrain-sweep"].info.status == "KILLED" and before["pretrain-1"].info.status == "KILLED"
    assert before["pretrain-0"].info.status == "FINISHED" and "pretrain-2" not in before

    again = run_cli(*args, env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"sweep: resuming the sweep of MLflow parent run {before['pretrain-sweep'].info.run_id}" in again.stderr
    assert "/0/pretrain is complete with this config" in again.stderr
    assert f"resuming MLflow run {before['pretrain-1'].info.run_id}" in again.stdout + again.stderr
    assert "sweep: 3 of 3 jobs finished (1 complete before, skipped)" in again.stderr
    assert list(tmp_path.glob("demo/multirun/pretrain/*")) == [sweep_dir], "the same sweep folder"

    after = {r.info.run_name: r for r in mlflow_runs(tracking_uri, experiment)}
    assert sorted(after) == ["pretrain-0", "pretrain-1", "pretrain-2", "pretrain-sweep"], "no run was repeated"
    assert after["pretrain-sweep"].info.run_id == before["pretrain-sweep"].info.run_id
    assert after["pretrain-sweep"].info.status == "FINISHED" and after["pretrain-sweep"].data.metrics["sweep/skipped_jobs"] == 1
    assert after["pretrain-0"].info.end_time == before["pretrain-0"].info.end_time, "job 0 did not run again"
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    client = MlflowClient(tracking_uri)
    assert [m.step for m in sorted(client.get_metric_history(after["pretrain-1"].info.run_id, "train/loss"),
                                   key=lambda m: m.step)] == list(range(1, 21)), "each step logged once"
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(j["job"], j["status"], j["skipped"]) for j in sweep["jobs"]] == \
        [(0, "COMPLETED", True), (1, "COMPLETED", False), (2, "COMPLETED", False)]
