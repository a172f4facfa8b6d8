"""The scaling stage: reads a sweep's runs from a real MLflow store (or a CSV), fits, plots, checks, and
names the runs when the input cannot be fitted."""
from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.contract import execute_stage
from pipeline.errors import BadInput, MissingUpstream
from pipeline.stages import load_stage
from pipeline.tracking import TrackingSettings, client_for, experiment_id
from tests.conftest import mlflow_runs

TRUE = {"E": 1.8, "A": 300.0, "B": 900.0, "alpha": 0.35, "beta": 0.3}


def law(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def grid(noise: float, seed: int = 0) -> list[tuple[float, float, float]]:
    """(N, D, loss) for 5 sizes x 3 budgets from the known law, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    return [(n, d, law(n, d) * math.exp(rng.normal(0, noise)))
            for n in (3e4, 1e5, 3e5, 1e6, 3e6) for d in (1e6, 1e7, 1e8)]


def fake_sweep(tracking_uri: str, experiment: str, points, statuses=None, drop=None, status="FINISHED") -> str:
    """A sweep as the pipeline logs one: a parent run and one child per job with N, D, C and val/loss."""
    client = client_for(TrackingSettings(tracking_uri, experiment))
    exp = experiment_id(client, TrackingSettings(tracking_uri, experiment))
    parent = client.create_run(exp, run_name="pretrain-sweep", tags={"sweep": "parent", "stage": "pretrain"})
    for i, (n, d, loss) in enumerate(points):
        tags = {"mlflow.parentRunId": parent.info.run_id, "sweep_job": str(i), "stage": "pretrain",
                "sweep_overrides": json.dumps([f"model.d_model={int(n)}", f"pretrain.max_steps={int(d)}"])}
        run = client.create_run(exp, run_name=f"pretrain-{i}", tags=tags)
        metrics = {"model/non_embedding_params": n, "train/tokens": d, "train/flops": 6 * n * d, "val/loss": loss}
        for key, value in metrics.items():
            if (drop or {}).get(i) != key:
                client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, (statuses or {}).get(i, "FINISHED"))
    client.set_terminated(parent.info.run_id, status)
    return parent.info.run_id


def test_fits_a_sweep_read_from_mlflow_with_intervals_plots_and_a_heldout_check(make_cfg, tracking_uri, experiment,
                                                                                tmp_path):
    points = grid(noise=0.003)
    parent = fake_sweep(tracking_uri, experiment, points + [(1e5, 1e6, 9.9)], statuses={15: "FAILED"}, status="FAILED")
    fake_sweep(tracking_uri, experiment, points[:4], statuses={3: "KILLED"}, status="KILLED")  # newer, cut short
    cfg = make_cfg("scaling.bootstrap_reps=60", "scaling.budgets=[1e18]")
    manifest = execute_stage("scaling", load_stage("scaling"), cfg)
    m, c = manifest["metrics"], manifest["counts"]
    assert c["sweep_run_id"] == parent and c["observations"] == 15 and c["left_out"] == {"pretrain-15": "FAILED"}, \
        "the failed job is reported and left out of the fit"
    assert c["runs"]["pretrain-3"]["swept"] == "model.d_model=100000 pretrain.max_steps=1000000"
    assert manifest["warnings"] == [], "3 budgets x 5 sizes determine the law"

    # Noise of 0.3% on 15 points: the exponents come back within 0.05; E, the least identified, within 10%.
    assert m["chinchilla/alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
    assert m["chinchilla/beta"] == pytest.approx(TRUE["beta"], abs=0.05)
    assert m["chinchilla/E"] == pytest.approx(TRUE["E"], rel=0.1)
    assert m["chinchilla/E/low"] <= m["chinchilla/E"] <= m["chinchilla/E/high"]
    n_opt, d_opt = m["chinchilla/n_opt/1e18"], m["chinchilla/d_opt/1e18"]
    assert 6 * n_opt * d_opt == pytest.approx(1e18, rel=1e-6)
    assert m["chinchilla/n_opt/1e18/low"] < n_opt < m["chinchilla/n_opt/1e18/high"]
    assert m["kaplan/N/alpha_published"] == 0.076 and m["kaplan/N/alpha"] > 0 and m["kaplan/C/alpha"] > 0
    assert manifest["outputs"]["heldout_run"].startswith("pretrain-") and \
        m["heldout/chinchilla/relative_error"] < 0.02, "the largest run is predicted within a few noise sigmas"

    out = tmp_path / "outputs" / "demo" / "scaling"
    for png in ("scaling.png", "parity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "fits.md").read_text()
    assert "Held-out check" in report and "0.076" in report and "Compute-optimal" in report
    run = MlflowClient(tracking_uri).get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["upstream.sweep.run_id"] == parent
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run.info.run_id)}
    assert {"scaling.png", "parity.png", "fits.md", "runs.csv"} <= artifacts

    # The runs table the stage writes is a CSV the stage reads back: the same fit.
    again = execute_stage("scaling", load_stage("scaling"),
                          make_cfg("scaling.bootstrap_reps=0", "scaling.budgets=[1e18]",
                                   f"scaling.csv={out / 'runs.csv'}",
                                   outputs_dir=tmp_path / "again"))
    assert again["metrics"]["chinchilla/alpha"] == pytest.approx(m["chinchilla/alpha"], rel=1e-6)


def test_a_sweep_whose_floor_runs_to_zero_still_gets_its_fits_intervals_and_plots(make_cfg, tracking_uri, experiment,
                                                                                  tmp_path, capfd):
    """What a fresh demo sweep gave: short runs whose loss still falls with no floor in sight, so the fit drives
    E to zero (here exp(-1130) = 0.0). The bootstrap restarted from log(E) and the stage FAILED on 'math domain
    error' with no fits.md; now it finishes, says E is not determined, and writes the rest."""
    rng = np.random.default_rng(0)
    points = [(n, d, (1e16 / (n * d)) ** 0.1 * math.exp(rng.normal(0, 0.003)))
              for n in (3e4, 1e5, 3e5, 1e6, 3e6) for d in (1e6, 1e7, 1e8)]
    fake_sweep(tracking_uri, experiment, points)
    manifest = execute_stage("scaling", load_stage("scaling"),
                             make_cfg("scaling.bootstrap_reps=20", "scaling.budgets=[1e18]"))
    m = manifest["metrics"]
    assert m["chinchilla/E"] < 0.01 * min(p[2] for p in points)
    warnings = manifest["warnings"]
    assert any(w.startswith("E is not determined: the fitted floor ran to zero") for w in warnings), warnings
    assert "scaling: warning: E is not determined" in capfd.readouterr().err
    for key in ("kaplan/N/alpha", "kaplan/C/alpha", "chinchilla/alpha", "chinchilla/n_opt/1e18"):
        assert m[f"{key}/low"] <= m[key] <= m[f"{key}/high"], key
    out = tmp_path / "outputs" / "demo" / "scaling"
    report = (out / "fits.md").read_text()
    assert "warning: E is not determined" in report and "): not determined |" in report and "| α_N |" in report
    for png in ("scaling.png", "parity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = MlflowClient(tracking_uri).get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "E is not determined" in run.data.tags["warnings"]


def test_an_undetermined_chinchilla_law_is_flagged():
    from pipeline.scaling.laws import BootstrapResult, ChinchillaLaw
    from pipeline.scaling.fits import doubts

    good = ChinchillaLaw.of(E=1.8, A=300, B=900, alpha=0.35, beta=0.3)
    tight = BootstrapResult(0.95, 100, {"chinchilla/alpha": (0.33, 0.37), "chinchilla/beta": (0.28, 0.32),
                                        "chinchilla/E": (1.7, 1.9)}, {})
    assert doubts(good, tight) == [] and doubts(None, tight) == []
    # What the demo sweep gave with only 2 token budgets: beta 39, E near 0, intervals spanning decades.
    bad = ChinchillaLaw.of(E=1.4e-10, A=10.6, B=1.7e216, alpha=0.046, beta=39.5)
    loose = BootstrapResult(0.95, 100, {"chinchilla/alpha": (0.036, 0.119), "chinchilla/beta": (0.61, 39.5),
                                        "chinchilla/E": (1.4e-10, 2.84)}, {})
    found = doubts(bad, loose)
    assert any(w.startswith("beta = 39.5 is outside (0, 2]") for w in found)
    assert any("interval of E" in w for w in found) and "sweep more sizes and token budgets" in found[-1]


def test_bad_sweeps_get_one_error_naming_the_runs(make_cfg, tracking_uri, experiment):
    with pytest.raises(MissingUpstream, match="has no sweep of the pretrain stage: run 'make sweep' first"):
        execute_stage("scaling", load_stage("scaling"), make_cfg())

    fake_sweep(tracking_uri, experiment, grid(0.0)[:3])
    too_few = r"\(5 parameters\) needs at least 5 runs but only 3 were given \(pretrain-0, pretrain-1, pretrain-2\)"
    with pytest.raises(BadInput, match=too_few):
        execute_stage("scaling", load_stage("scaling"), make_cfg())

    points = grid(0.0)
    points[4] = (points[4][0], points[4][1], float("nan"))
    fake_sweep(tracking_uri, experiment, points, drop={7: "train/tokens"})
    with pytest.raises(BadInput, match=r"run pretrain-7 has no train/tokens"):
        execute_stage("scaling", load_stage("scaling"), make_cfg())
    fake_sweep(tracking_uri, experiment, points)
    with pytest.raises(BadInput, match=r"run pretrain-4: loss is nan"):
        execute_stage("scaling", load_stage("scaling"), make_cfg())
    fake_sweep(tracking_uri, experiment, [(n, d, 4.0) for n, d, _ in grid(0.0)])  # a loss that ignores N, D and C
    with pytest.raises(BadInput, match=r"no scaling law could be fitted to 15 runs: L\(N\) not fitted: .*the loss "
                                       r"does not change with x"):
        execute_stage("scaling", load_stage("scaling"), make_cfg("scaling.laws=[kaplan]"))
    assert all(r.info.status == "FAILED" for r in mlflow_runs(tracking_uri, experiment)
               if r.data.tags.get("stage") == "scaling")


def test_a_csv_of_published_measurements_with_compute_instead_of_tokens(make_cfg, tmp_path):
    path = tmp_path / "published.csv"
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["Name", "N", "C", "Loss"])
        out.writerows([f"m{i}", n, 6 * n * d, loss] for i, (n, d, loss) in enumerate(grid(0.002, seed=3)))
    manifest = execute_stage("scaling", load_stage("scaling"),
                             make_cfg(f"scaling.csv={path}", "scaling.bootstrap_reps=0", "scaling.laws=[chinchilla]"))
    m = manifest["metrics"]
    assert manifest["counts"]["csv"] == str(path) and m["scaling/runs"] == 15
    assert m["chinchilla/beta"] == pytest.approx(TRUE["beta"], abs=0.05)
    assert not any(k.startswith("kaplan/") for k in m), "only the laws asked for"

    path.write_text("N,C,loss\n1e6,2e15,3.1\n2e6,abc,2.9\n")
    with pytest.raises(BadInput, match=r"published.csv row 2 \(line 3\), column C: 'abc' is not a number"):
        execute_stage("scaling", load_stage("scaling"), make_cfg(f"scaling.csv={path}"))


@pytest.mark.slow
def test_a_two_job_sweep_is_one_parent_with_two_children_that_scaling_reads(tmp_path, tracking_uri, experiment,
                                                                            data_dir, tokenized, make_cfg):
    from tests.conftest import link_tokenize, run_cli, tiny_tokenize_overrides

    link_tokenize(tokenized, tmp_path)  # the session's tiny tokenize output: what the sweep's jobs train on
    common = [f"paths.outputs_dir={tmp_path}", f"tracking.experiment={experiment}", *tiny_tokenize_overrides(data_dir),
              "tokenizer.vocab_size=512"]
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    proc = run_cli("pretrain", "-m", "model=tiny", "model.d_model=16,64", "model.d_ff=null", "pretrain.max_steps=25",
                   "pretrain.micro_batch_size=8", "pretrain.eval_every_steps=25", "pretrain.eval_windows=16",
                   "pretrain.optim.warmup_steps=5",
                   "pretrain.sample_every_steps=0", "pretrain.export=false", *common, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep: 2 of 2 jobs finished" in proc.stderr
    runs = mlflow_runs(tracking_uri, experiment)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)

    # The sweep is the command line's (-m); the scaling stage reads its runs from the store the same way in this process.
    execute_stage("scaling", load_stage("scaling"),
                  make_cfg("scaling.laws=[kaplan]", "scaling.bootstrap_reps=10", outputs_dir=tmp_path))
    manifest = json.loads((tmp_path / "demo" / "scaling" / "manifest.json").read_text())
    assert manifest["counts"]["sweep_run_id"] == parent.info.run_id
    assert {v["run_id"] for v in manifest["counts"]["runs"].values()} == {c.info.run_id for c in children}
    assert sorted(v["swept"] for v in manifest["counts"]["runs"].values()) == ["model.d_model=16", "model.d_model=64"]
    n = sorted(c.data.metrics["model/non_embedding_params"] for c in children)
    assert n == [12 * 2 * d * d + 13 * 2 * d + 2 * d for d in (16, 64)], "N = 12 L d^2 + biases and norms, per job"
    assert math.isfinite(manifest["metrics"].get("kaplan/N/alpha", math.nan)), manifest["counts"]["kaplan_skipped"]

    # The Chinchilla law (5 parameters) cannot be fitted to 2 runs: one error naming them.
    with pytest.raises(BadInput, match=re.escape("needs at least 5 runs but only 2 were given (pretrain-0, pretrain-1)")):
        execute_stage("scaling", load_stage("scaling"), make_cfg(outputs_dir=tmp_path))
