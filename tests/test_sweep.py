"""Sweeps (Hydra multirun): a job whose swept value does not validate fails alone, and the others run."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from pipeline.config import CONF_DIR
from pipeline.sweep import composition_error
from tests.conftest import mlflow_runs, run_cli, tiny_tokenize_overrides


@pytest.mark.parametrize("override, line", [
    ("pretrain.max_steps=abc", "config key 'pretrain.max_steps': Value 'abc' of type 'str' could not be converted "
                               "to Integer"),
    ("tokenizer.kind=nope", "config key 'tokenizer.kind': Invalid value 'nope', expected one of [bpe, bytes, file]"),
    ("model=nonexistent", "In 'config': Could not find 'model/nonexistent'"),
])
def test_a_value_that_does_not_compose_is_one_line_naming_the_key(override, line):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as caught:
            compose("config", overrides=[override])
    assert composition_error(caught.value) == line


@pytest.mark.slow
def test_a_swept_value_that_does_not_validate_fails_alone_and_the_others_run(tracking_uri, experiment, tmp_path,
                                                                             data_dir):
    """'abc' fails while Hydra composes the job's config (it used to stop the sweep before any job ran), 0 when
    the stage loads it; each is a failed job with one line naming the key. 200 fails in the stage's run (below the
    256 bytes + special tokens a byte-level BPE needs), and 512 is tokenized."""
    proc = run_cli("tokenize", "-m", "tokenizer.vocab_size=abc,0,200,512", f"paths.outputs_dir={tmp_path}",
                   f"tracking.experiment={experiment}", *tiny_tokenize_overrides(data_dir),
                   env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "sweep: 1 of 4 jobs finished" in proc.stderr, proc.stderr[-3000:]
    assert "sweep: failed job tokenize-2 (tokenizer.vocab_size=200): error: tokenize: tokenizer.vocab_size=200 is " \
           "below" in proc.stderr
    assert ("sweep: failed job tokenize-0 (tokenizer.vocab_size=abc): error: tokenize: config key "
            "'tokenizer.vocab_size': Value 'abc' of type 'str' could not be converted to Integer") in proc.stderr
    assert "sweep: failed job tokenize-1 (tokenizer.vocab_size=0): error: tokenize: config key " \
           "'tokenizer.vocab_size' is 0" in proc.stderr
    assert "Traceback" not in proc.stderr

    (summary,) = tmp_path.glob("demo/multirun/tokenize/*/sweep.json")
    sweep = json.loads(summary.read_text())
    jobs = {j["swept"]: j for j in sweep["jobs"]}
    assert sweep["status"] == "FAILED" and sorted(jobs) == ["tokenizer.vocab_size=0", "tokenizer.vocab_size=200",
                                                             "tokenizer.vocab_size=512", "tokenizer.vocab_size=abc"]
    assert (jobs["tokenizer.vocab_size=200"]["status"], jobs["tokenizer.vocab_size=200"]["run_status"]) == \
        ("FAILED", "FAILED")
    assert "is below" in jobs["tokenizer.vocab_size=200"]["error"], "the job's error is kept"
    assert (jobs["tokenizer.vocab_size=abc"]["status"], jobs["tokenizer.vocab_size=abc"]["run_status"]) == \
        ("FAILED", "no run")
    assert "\n" not in jobs["tokenizer.vocab_size=abc"]["error"]
    assert jobs["tokenizer.vocab_size=0"]["status"] == "FAILED"
    assert (jobs["tokenizer.vocab_size=512"]["status"], jobs["tokenizer.vocab_size=512"]["run_status"]) == \
        ("COMPLETED", "FINISHED")
    # each job writes its own output, not over outputs/<exp>/tokenize
    assert len(list(tmp_path.glob("demo/multirun/tokenize/*/3/tokenize/manifest.json"))) == 1
    assert not (tmp_path / "demo" / "tokenize").exists()

    runs = mlflow_runs(tracking_uri, experiment)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep/failed_jobs"] == 3
    assert parent.data.tags["failed_jobs"].startswith("tokenize-0 (tokenizer.vocab_size=abc): ")
    assert {r.data.params["tokenizer.vocab_size"]: r.info.status for r in runs if r is not parent} == \
        {"200": "FAILED", "512": "FINISHED"}, "0 fails as the stage loads its config, before its run exists"
    children = [r for r in runs if r is not parent]
    assert parent.data.metrics["energy/kwh"] == pytest.approx(sum(r.data.metrics.get("energy/kwh", 0) for r in children))
    assert parent.data.metrics["energy/kwh"] > 0, "the sweep's energy is its jobs' sum"
