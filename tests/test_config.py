"""Config composition, the schema's errors, and the entry point's flags."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.config import RootConfig, typed, validate
from pipeline.data.sources import SourceSpec, resolve_files
from pipeline.errors import PipelineError
from pipeline.stages import STAGES
from tests.conftest import CONF_DIR, run_cli

PRESETS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("*.yaml"))


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_its_sources_exist(preset, data_dir):
    cfg = _compose(f"experiment={preset}", f"paths.data_dir={data_dir}")
    assert cfg.name == preset, "a preset's name must match its file: Make finds outputs/<EXP>/ by it"
    resolved = OmegaConf.to_object(cfg)  # resolves every interpolation and builds the dataclasses
    assert isinstance(resolved, RootConfig)
    assert resolved.tracking.uri.startswith(("sqlite:////", "http"))
    validate(cfg)
    for name, node in [*cfg.tokenize.sources.items(), *cfg.cpt.sources.items()]:
        source = typed(node, SourceSpec, name)
        if source.path is not None:
            assert resolve_files(name, source.path), name


def test_demo_is_the_default_preset():
    assert _compose().name == "demo"


def test_misspelled_key_is_named():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("tokenizer.vocab_sizee=8000")
    assert "vocab_sizee" in str(err.value) + str(err.value.__cause__)


def test_mistyped_value_is_named():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("tokenizer.vocab_size=lots")
    message = str(err.value) + str(err.value.__cause__)
    assert "tokenizer.vocab_size" in message and "lots" in message


def test_unknown_tokenizer_kind_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("tokenizer.kind=wordpiece")
    assert "bpe" in str(err.value.__cause__) and "bytes" in str(err.value.__cause__)


def test_appended_unknown_key_is_rejected_by_validate():
    cfg = _compose("+tokenizer.vocab_sizee=8000")  # '+' opens the struct flag; validate closes the gap
    with pytest.raises(PipelineError, match="tokenizer.vocab_sizee"):
        validate(cfg)
    validate(_compose())


def test_mlflow_tracking_uri_environment_variable_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert _compose().tracking.uri == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = _compose().tracking.uri
    assert uri == f"sqlite:///{PROJECT_ROOT}/outputs/mlflow.db" and Path(uri[len("sqlite:///"):]).is_absolute()


def test_cli_misspelled_key_fails_with_one_message_naming_it():
    proc = run_cli("tokenize", "tokenizer.vocab_sizee=8000")
    assert proc.returncode != 0
    assert "vocab_sizee" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_lists_stages_and_rejects_unknown_ones():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for stage in STAGES:
        assert stage in proc.stdout
    proc = run_cli("tokenise")
    assert proc.returncode == 2 and "unknown stage 'tokenise'" in proc.stderr


def test_cli_stage_help_and_cfg_job():
    proc = run_cli("tokenize", "--help")
    assert proc.returncode == 0
    assert "python -m pipeline tokenize" in proc.stdout and "tokenizer: bpe, bytes, file" in proc.stdout
    proc = run_cli("tokenize", "--cfg", "job", "tokenizer.vocab_size=777")
    assert proc.returncode == 0
    printed = yaml.safe_load(proc.stdout)
    assert printed["tokenizer"]["vocab_size"] == 777 and "sources" in printed["tokenize"]
