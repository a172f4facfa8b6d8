"""Config composition, the schema's errors, and the entry point's flags."""
from __future__ import annotations

from pathlib import Path

import re

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.config import RootConfig, load
from pipeline.config import compose as compose_typed
from pipeline.contract import stage_config
from pipeline.data.sources import SourceSpec, StageOrPath, resolve_files
from pipeline.errors import PipelineError
from pipeline.model.spec import BlockKind
from pipeline.sft.lora import LoraSpec
from pipeline.tokenizer.build import TokenizerKind
from pipeline.stages import STAGES, TOOLS, load_stage
from tests.conftest import CONF_DIR, run_cli

PRESETS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("*.yaml"))


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_its_sources_exist(preset, data_dir):
    cfg = compose_typed(f"experiment={preset}", f"paths.data_dir={data_dir}")
    assert isinstance(cfg, RootConfig)
    assert cfg.name == preset, "a preset's name must match its file: Make finds outputs/<EXP>/ by it"
    assert cfg.tracking.uri.startswith(("sqlite:////", "http"))
    for name, source in [*cfg.tokenize.sources.items(), *cfg.cpt.sources.items()]:
        assert isinstance(source, SourceSpec)
        if source.path is not None:
            assert resolve_files(name, source.path), name


@pytest.mark.parametrize("override, key, problem", [
    ("sft.lora.rank=0", "sft.lora.rank", "is 0; it must be at least 1"),
    ("model.n_head=3", "model.n_head", "divide d_model"),
    ("pretrain.optim.lr=0", "pretrain.optim.lr", "positive"),
    ("dedup.near.threshold=1.5", "dedup.near.threshold", "in (0, 1]"),
    ("tokenize.val_fraction=1", "tokenize.val_fraction", "in [0, 1)"),
    ("cpt.init.path=/somewhere", "cpt.init", "sets both of 'stage' and 'path'"),
    ("+tokenize.sources.extra.format=json", "tokenize.sources.extra", "sets neither of 'stage' and 'path'"),
    ("+cpt.sources.web.stage=dedup", "cpt.sources.web.stage", "the domain corpus is read from files"),
])
def test_a_bad_value_names_its_full_key(override, key, problem):
    with pytest.raises(PipelineError) as err:
        compose_typed(override)
    assert str(err.value).startswith(f"config key '{key}'") and problem in str(err.value)


def test_good_values_arrive_typed():
    cfg = compose_typed("+evaluate.models.mine.path=/models/gpt2", "tokenizer.kind=file", "model.block=llama")
    assert cfg.evaluate.models["mine"] == StageOrPath(path="/models/gpt2")
    assert cfg.tokenizer.kind is TokenizerKind.file and cfg.model.block is BlockKind.llama
    assert cfg.model.as_dict()["block"] == "llama" and type(cfg.model.as_dict()["block"]) is str


@pytest.mark.parametrize("override, choices", [("model.block=gru", "gpt, llama"), ("sft.template=alpaca", "chatml"),
                                               ("dedup.keep=last", "first, longest, quality"),
                                               ("pretrain.optim.schedule=step", "cosine, wsd, constant")])
def test_a_choice_outside_its_enum_lists_the_choices(override, choices):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(override)
    assert choices in str(err.value.__cause__)


def test_library_specs_check_values_given_in_code_too():
    with pytest.raises(PipelineError, match="config key 'bias' is 'some'; it must be one of none, all, lora_only"):
        LoraSpec(bias="some")
    assert LoraSpec(bias="all").bias == "all"


def test_the_dataclasses_alone_hold_the_defaults():
    """conf/<stage>.yaml and the steps' and levels' files set only what differs from the dataclass defaults."""
    defaults = OmegaConf.to_container(OmegaConf.structured(RootConfig), resolve=False)

    def restated(data, node, path):
        for key, value in data.items():
            if not isinstance(node, dict) or key not in node:
                continue
            if isinstance(value, dict) and isinstance(node[key], dict) and value and node[key]:
                yield from restated(value, node[key], f"{path}{key}.")
            elif value == node[key]:
                yield f"{path}{key}"

    conf = PROJECT_ROOT / "conf"
    files = [(p, "") for p in conf.glob("*.yaml") if p.name != "config.yaml"]
    files += [(p, re.search(r"# @package (\S+)", p.read_text()).group(1) + ".")
              for group in ("filter", "dedup") for p in (conf / group).glob("*.yaml")]
    for path, package in files:
        data = yaml.safe_load(path.read_text()) or {}
        node = defaults
        for part in package.split(".")[:-1]:
            node = node[part]
        assert not list(restated(data, node, package)), f"{path} restates the dataclass defaults"


def test_a_stage_sees_only_the_sections_it_declares():
    cfg = compose_typed()
    for name in [*STAGES, *TOOLS]:
        module = load_stage(name)
        section = stage_config(name, module, cfg)
        for key in module.SECTIONS:
            assert getattr(section, key) is getattr(cfg, key)
        hidden = next(k for k in ("scaling", "filter") if k not in module.SECTIONS)
        with pytest.raises(AttributeError, match=f"reads config section '{hidden}' but does not list it"):
            getattr(section, hidden)


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


def test_appended_unknown_key_is_rejected_by_load():
    cfg = _compose("+tokenizer.vocab_sizee=8000")  # '+' opens the struct flag; load closes the gap
    with pytest.raises(PipelineError, match="tokenizer.vocab_sizee"):
        load(cfg)
    assert isinstance(load(_compose()), RootConfig)


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
