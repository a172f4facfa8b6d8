"""The tokenize stage end to end on real data: shards decode back to the documents, counts add up."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from tokenizers import Tokenizer

from pipeline.contract import MANIFEST, execute_stage
from pipeline.data.shards import open_shards
from pipeline.data.sources import SourceSpec, load_documents
from pipeline.errors import BadInput
from pipeline.stages import load_stage
from tests.conftest import mlflow_runs, run_cli


def _run(cfg):
    return execute_stage("tokenize", load_stage("tokenize"), cfg)


def _source_texts(cfg) -> list[str]:
    return load_documents(cfg.tokenize.sources, cache_dir=cfg.paths.cache_dir)["text"]


def test_shards_decode_back_to_every_document(make_cfg, tracking_uri, experiment):
    cfg = make_cfg()
    manifest = _run(cfg)
    out = Path(cfg.paths.outputs_dir) / "demo" / "tokenize"
    assert json.loads((out / MANIFEST).read_text()) == json.loads(json.dumps(manifest))
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith((".bin", ".npy"))) == [
        "DATASET_CARD.md", "corpus.png", MANIFEST, "tokenizer.json", "val.parquet"]
    assert manifest["outputs"]["card"] == "DATASET_CARD.md"
    assert (out / "corpus.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = manifest["outputs"]["eos_id"]
    assert tok.id_to_token(eos) == "</s>" and manifest["outputs"]["shards"]["dtype"] == "uint16"

    decoded, val_decoded = [], []
    for split in ("train", "val"):
        for shard in open_shards(out, manifest["outputs"]["shards"], split):
            ends = shard.doc_offsets[1:] - 1
            assert np.all(shard.tokens[ends] == eos), "every document ends with EOS"
            assert np.count_nonzero(shard.tokens == eos) == len(ends), "EOS appears only between documents"
            docs = [tok.decode(shard.document(i)[:-1].tolist(), skip_special_tokens=False) for i in range(len(ends))]
            decoded += docs
            val_decoded += docs if split == "val" else []
    texts = _source_texts(cfg)
    assert Counter(decoded) == Counter(t for t in texts if t.strip()), "kept documents are exactly the non-empty input"

    held_out = pq.read_table(out / manifest["outputs"]["val_documents"]).to_pylist()
    assert Counter(r["text"] for r in held_out) == Counter(val_decoded), "val.parquet holds the validation documents"
    assert Counter(r["source"] for r in held_out) == {n: s["val"]["documents"]
                                                      for n, s in manifest["counts"]["per_source"].items()
                                                      if s["val"]["documents"]}

    c = manifest["counts"]
    assert c["documents_in"] == len(texts) == c["train"]["documents"] + c["val"]["documents"] + c["empty"]["documents"]
    assert sum(s["train"]["tokens"] for s in c["per_source"].values()) == c["train"]["tokens"]
    assert c["val"]["documents"] > 0 and c["train"]["documents"] > 10 * c["val"]["documents"]
    assert c["vocab_size"] == {"requested": 512, "actual": 512} and manifest["warnings"] == []

    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.info.status == "FINISHED" and run.info.run_id == manifest["mlflow_run_id"]
    assert run.data.params["tokenizer.vocab_size"] == "512" and run.data.tags["stage"] == "tokenize"
    assert run.data.metrics["tokenize/vocab_size"] == run.data.metrics["tokenize/vocab_size_requested"] == 512
    assert "warnings" not in run.data.tags
    assert run.data.metrics["tokenize/val_bytes_per_token"] == pytest.approx(c["val"]["bytes"] / c["val"]["tokens"])
    assert run.data.metrics["tokenize/encode_mb_per_s"] > 0
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run.info.run_id)}
    assert {"corpus.png", "manifest.json", "config.yaml"} <= artifacts
    assert manifest["git_commit"] and manifest["wall_time_s"] > 0 and len(manifest["config_hash"]) == 16


def test_byte_level_tokenizer_has_one_token_per_byte(make_cfg):
    manifest = _run(make_cfg("tokenizer=bytes"))
    c = manifest["counts"]
    assert manifest["outputs"]["vocab_size"] == 256 + 9
    assert c["vocab_size"] == {"requested": None, "actual": 256 + 9} and manifest["warnings"] == [], \
        "bytes ignores vocab_size"
    for split in ("train", "val"):  # one token per UTF-8 byte plus one EOS per document
        assert c[split]["tokens"] == c[split]["bytes"] + c[split]["documents"]


@pytest.mark.slow
def test_config_hash_follows_the_config_and_reruns_replace_the_output(make_cfg):
    first = _run(make_cfg())
    again = _run(make_cfg())
    other = _run(make_cfg("tokenizer.vocab_size=600"))
    assert first["config_hash"] == again["config_hash"] != other["config_hash"]
    assert first["mlflow_run_id"] != again["mlflow_run_id"]
    assert other["outputs"]["vocab_size"] == 600


@pytest.mark.slow
def test_a_vocab_size_the_corpus_cannot_fill_is_reported_not_capped_silently(make_cfg, tracking_uri, experiment,
                                                                             capfd):
    manifest = _run(make_cfg("tokenizer.vocab_size=50000", "++tokenize.sources.shakespeare.max_documents=100"))
    got = manifest["outputs"]["vocab_size"]
    assert 265 < got < 50_000 and manifest["counts"]["vocab_size"] == {"requested": 50_000, "actual": got}
    (warning,) = manifest["warnings"]
    assert warning.startswith(f"tokenizer.vocab_size=50000 asked, got {got} tokens (256 bytes + 9 special + ")
    assert f"tokenize: warning: {warning}\n" in capfd.readouterr().err
    (run,) = mlflow_runs(tracking_uri, experiment)
    assert run.data.metrics["tokenize/vocab_size_requested"] == 50_000 and run.data.metrics["tokenize/vocab_size"] == got
    assert run.data.tags["warnings"] == warning


@pytest.mark.slow
def test_a_source_without_text_is_refused_in_one_line_before_datasets_reads_it(make_cfg, tmp_path, tracking_uri):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(BadInput, match=rf"^tokenize\.sources\.web: all 2 documents of {blank} are blank, so there is "
                                       r"nothing to tokenize$"):
        _run(make_cfg(f"tokenize.sources.web.path={blank}"))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_cli("tokenize", f"paths.outputs_dir={tmp_path / 'out'}", f"tracking.uri={tracking_uri}",
                   "~tokenize.sources.novels", "tokenize.sources.web.stage=null", f"++tokenize.sources.web.path={empty}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"tokenize.sources.web: {empty} holds no documents (1 file(s), all empty)" in proc.stderr
