"""No code runs from a checkpoint: a pickle payload in a .ckpt or model.pt is refused by every entry point that
reads one (load_model, load_pretrained, generate, sft.init.path, evaluate.models.<m>.path), in one line naming
the file, while the checkpoints this pipeline writes (model.pt, Lightning .ckpt) still load."""
from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import PROJECT_ROOT
from pipeline.config import compose
from pipeline.contract import execute_stage
from pipeline.errors import BadInput
from pipeline.evaluate.models import load_any
from pipeline.model.checkpoints import checkpoints
from pipeline.model.generate import main as generate_main
from pipeline.model.gpt import GPT, ModelConfig, load_model, save_model
from pipeline.model.io import load_pretrained
from pipeline.stages import load_stage
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer
from pipeline.train.module import LanguageModel, OptimSpec
from tests.model.conftest import random_model

# A plain pickle (protocol 4) makes torch warn before it refuses the file.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


class Payload:
    """Unpickling it calls ``call(*args)``: what a crafted checkpoint would run on the user's machine."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def system_payload(marker: Path) -> Payload:
    return Payload(os.system, f"touch '{marker}'")


def open_payload(marker: Path) -> Payload:
    return Payload(open, str(marker), "w")


def write_torch_zip(blob, path: Path) -> None:
    torch.save(blob, path)


def write_torch_legacy(blob, path: Path) -> None:
    torch.save(blob, path, _use_new_zipfile_serialization=False)


def write_plain_pickle(blob, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(blob, f)


WRITERS = {"zip": write_torch_zip, "legacy": write_torch_legacy, "pickle": write_plain_pickle}
PAYLOADS = {"os.system": system_payload, "open": open_payload}


def crafted_blob(payload: Payload, in_config: bool = False) -> dict:
    """A model.pt as save_model writes it, with the payload beside (a loader that unpickles it runs it, and
    then loads the model as if nothing happened) or ``in_config`` (it runs, then the model fails to build)."""
    model = random_model("gpt")
    if in_config:
        return {"config": {**model.cfg.as_dict(), "note": payload}, "state_dict": model.state_dict()}
    return {"config": model.cfg.as_dict(), "state_dict": model.state_dict(), "note": payload}


@pytest.fixture(params=[(w, p) for w in WRITERS for p in PAYLOADS], ids=lambda wp: f"{wp[0]}-{wp[1]}")
def crafted(request, tmp_path):
    """(checkpoint path, marker path): a stage-style directory holding a crafted step-*.ckpt, model.pt and
    tokenizer.json. The payload is live: loading it the old way creates the marker."""
    writer, payload = WRITERS[request.param[0]], PAYLOADS[request.param[1]]
    marker = tmp_path / "PWNED"
    directory = tmp_path / "crafted"
    (directory / "checkpoints").mkdir(parents=True)
    byte_tokenizer(SpecialTokens().all()).save(str(directory / "tokenizer.json"))
    blob = crafted_blob(payload(marker))
    for path in (directory / "model.pt", directory / "checkpoints" / "step-000010.ckpt"):
        writer(blob, path)

    try:
        torch.load(directory / "model.pt", weights_only=False)  # what load_model did before the fix
    except RuntimeError:  # a plain pickle is no torch file, but only after the payload ran
        pass
    assert marker.exists(), "the payload is live: the unsafe load runs it"
    marker.unlink()
    return directory, marker


def error_of(call, marker: Path) -> Exception | None:
    """What ``call()`` raised (None if nothing), once it is clear that it did not run the payload."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the test asserts what it is
        error = e
    else:
        error = None
    assert not marker.exists(), "the payload ran"
    return error


def assert_refused(message: str, path: Path) -> None:
    assert str(path) in message and "refuses to unpickle" in message and "not a checkpoint this pipeline wrote" \
        in message, message
    assert "\n" not in message.strip(), f"one line, got: {message}"


def test_load_model_and_load_pretrained_refuse_a_payload(crafted):
    directory, marker = crafted
    ckpt = directory / "checkpoints" / "step-000010.ckpt"
    for load, path, named in [(load_model, ckpt, ckpt), (load_model, directory, directory / "model.pt"),
                              (load_pretrained, ckpt, ckpt), (load_pretrained, directory, directory / "model.pt")]:
        error = error_of(lambda: load(path), marker)
        assert isinstance(error, BadInput), f"{load.__name__}({path}) gave {error!r}"
        assert_refused(str(error), named)


def test_generate_refuses_a_payload_in_one_line(crafted, capsys):
    directory, marker = crafted
    ckpt = directory / "checkpoints" / "step-000010.ckpt"
    for path, named in [(ckpt, ckpt), (directory, directory / "model.pt")]:
        codes = []
        assert error_of(lambda: codes.append(generate_main([str(path), "--prompt", "a", "--max-new-tokens", "2"])),
                        marker) is None
        err = capsys.readouterr().err
        assert codes == [2], err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert_refused(err, named)
    assert not marker.exists()


def test_evaluate_refuses_a_payload(crafted):
    directory, marker = crafted
    error = error_of(lambda: load_any("crafted", directory / "checkpoints" / "step-000010.ckpt", None, "</s>", "cpu"),
                     marker)
    assert isinstance(error, BadInput), repr(error)
    assert_refused(str(error), directory / "checkpoints" / "step-000010.ckpt")


def test_make_generate_command_refuses_a_payload(tmp_path):
    """`make generate` runs this module: a fresh interpreter, the exit code and stderr the user sees."""
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "pretrain" / "last.ckpt"
    ckpt.parent.mkdir()
    byte_tokenizer(SpecialTokens().all()).save(str(ckpt.parent / "tokenizer.json"))
    write_torch_zip(crafted_blob(system_payload(marker)), ckpt)
    proc = subprocess.run([sys.executable, "-m", "pipeline.model.generate", str(ckpt), "--prompt", "a"],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert not marker.exists(), "the payload ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert_refused(proc.stderr, ckpt)
    assert "posix.system" in proc.stderr, "the message names the type the file wanted"
    assert not marker.exists()


def test_sft_init_path_refuses_a_payload(tmp_path, tracking_uri, experiment, data_dir):
    marker = tmp_path / "PWNED"
    base = tmp_path / "base"
    base.mkdir()
    byte_tokenizer(SpecialTokens().all()).save(str(base / "tokenizer.json"))
    write_torch_zip(crafted_blob(open_payload(marker), in_config=True), base / "model.pt")  # no training after it
    cfg = compose(f"paths.outputs_dir={tmp_path / 'outputs'}", f"paths.data_dir={data_dir}",
                  f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}",
                  "sft.init.stage=null", f"sft.init.path={base}")
    error = error_of(lambda: execute_stage("sft", load_stage("sft"), cfg), marker)
    assert isinstance(error, BadInput), repr(error)
    assert_refused(str(error), base / "model.pt")
    assert "io.open" in str(error)


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(BadInput, match="weights.pt is neither a model.pt"):
        load_model(path)


# What this pipeline writes still loads.

def test_a_real_lightning_checkpoint_loads_through_every_entry_point(tmp_path, capsys):
    """A checkpoint from a real (3-step) training run: Checkpointer -> trainer.save_checkpoint, with the
    optimizer, LR scheduler (LRSchedule) and loop state."""
    from tests.train.test_run import Recorder, spec
    from pipeline.data.shards import ShardWriter
    from pipeline.tokenizer.encode import TokenShards
    from pipeline.train.run import TrainerSpec, train_model
    import numpy as np

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    index = {"dtype": "uint16", "splits": {}}
    for split, n in (("train", 3_000), ("val", 500)):
        writer = ShardWriter(shard_dir, split, np.dtype(np.uint16), 10_000)
        writer.add((np.random.default_rng(0).integers(0, 30, n) * 7 % 256).astype(np.uint16), np.array([n]))
        index["splits"][split] = writer.close()
    shards = TokenShards(shard_dir, index, val_bytes_per_token=1.0)
    tokenizer_json = tmp_path / "tokenizer.json"
    byte_tokenizer(SpecialTokens().all()).save(str(tokenizer_json))
    shape = ModelConfig(block="llama", n_layer=1, n_head=2, d_model=16, d_ff=32, context=16, vocab_size=265)
    trained, _ = train_model(shape, shards, {"val": shards}, spec(3), TrainerSpec(accelerator="cpu"), 7,
                             tmp_path / "run", tokenizer_json, None, Recorder())
    (ckpt,) = checkpoints(tmp_path / "run")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == [], "plain values only"
    blob = torch.load(ckpt, weights_only=True)
    assert blob["lr_schedulers"] and blob["optimizer_states"], "the full training state, not just weights"

    ids = torch.randint(0, 265, (1, 8))
    for model in (load_model(ckpt), load_pretrained(ckpt).model):
        assert torch.equal(model.eval()(ids)[0], trained.eval()(ids)[0])
    capsys.readouterr()
    assert generate_main([str(ckpt), "--prompt", "a", "--max-new-tokens", "3", "--eos-token", ""]) == 0
    assert capsys.readouterr().out.startswith("a")


def test_a_lightning_checkpoint_holds_plain_values_whatever_the_module_was_given(tmp_path):
    """LanguageModel given dataclass dicts (enums inside, as tests/train/test_signals passes) still writes a
    checkpoint that loads with weights_only=True."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    shape = ModelConfig(block="llama", n_layer=1, n_head=2, d_model=16, d_ff=32, context=8, vocab_size=50)
    module = LanguageModel(dataclasses.asdict(shape), dataclasses.asdict(OptimSpec(warmup_steps=0)), 2)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(torch.randint(0, 50, (4, 9)), batch_size=2))
    ckpt = tmp_path / "module.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
    assert torch.equal(load_model(ckpt).state_dict()["tok_emb.weight"], module.model.tok_emb.weight)


def test_save_model_output_loads(tmp_path):
    model = random_model("llama")
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path)
    assert isinstance(loaded, GPT)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
