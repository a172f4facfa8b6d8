"""Encoding a corpus into token shards: held-out text, shards that decode to the documents, nothing left aside."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from pipeline.data.sources import SourceSpec
from pipeline.errors import BadInput
from pipeline.tokenizer.build import SpecialTokens, byte_tokenizer, token_id, vocab_bound
from pipeline.tokenizer.encode import EncodeSpec, TokenShards, encode_sources, refuse_empty_sources


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_tokenizer(SpecialTokens().all())


def peps(data_dir, **kwargs) -> dict[str, SourceSpec]:
    return {"peps": SourceSpec(path=str(data_dir / "domain" / "python_peps" / "peps.jsonl.gz"), **kwargs)}


def test_sources_become_shards_that_decode_to_their_documents(tokenizer, data_dir, tmp_path):
    eos = token_id(tokenizer, "</s>", "the byte tokenizer", "eos")
    out = tmp_path / "data"
    corpus = encode_sources(peps(data_dir, max_documents=30), tokenizer, eos, out, val_fraction=0.2, seed=0,
                            spec=EncodeSpec(num_proc=2, batch_size=4, max_shard_tokens=50_000),
                            cache_dir=tmp_path / "cache", key="cpt")
    totals = corpus.totals()
    assert totals["train"]["documents"] + totals["val"]["documents"] + totals["empty"]["documents"] == 30
    assert totals["val"]["documents"] >= 1 and len(corpus.shards.index["splits"]["train"]) > 1, \
        "a small max_shard_tokens starts new shards"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("train-", "val-"))) == ["val.parquet"], \
        "the encoded Arrow files (one per worker) are removed"
    val_text = pq.read_table(out / "val.parquet").column("text").to_pylist()
    val_tokens = [t for s in corpus.shards.tokens("val") for t in s.tolist()]
    assert tokenizer.decode(val_tokens, skip_special_tokens=False) == "".join(t + "</s>" for t in val_text)
    assert corpus.shards.val_bytes_per_token == pytest.approx(totals["val"]["bytes"] / totals["val"]["tokens"])
    assert totals["val"]["tokens"] == len(val_tokens) and totals["val"]["bytes"] == sum(len(t.encode()) for t in val_text)


def test_the_published_shards_of_a_tokenize_stage_are_read_from_its_manifest(tmp_path):
    manifest = {"outputs": {"shards": {"dtype": "uint16", "splits": {}}},
                "metrics": {"tokenize/val_bytes_per_token": 3.5}}
    assert TokenShards.published(tmp_path, manifest) == TokenShards(tmp_path, manifest["outputs"]["shards"], 3.5)


def test_an_empty_corpus_or_validation_split_is_a_user_error(tokenizer, data_dir, tmp_path):
    args = dict(tokenizer=tokenizer, eos_id=0, seed=0, spec=EncodeSpec(), cache_dir=tmp_path / "cache", key="cpt")
    with pytest.raises(BadInput, match=r"cpt\.sources is empty"):
        encode_sources({}, out_dir=tmp_path / "a", val_fraction=0.1, **args)
    with pytest.raises(BadInput, match=r"the validation split of cpt\.sources is empty \(2 documents, "
                                       r"cpt\.val_fraction=0\.001\)"):
        encode_sources(peps(data_dir, max_documents=2), out_dir=tmp_path / "b", val_fraction=0.001, **args)


def test_vocab_bound_counts_the_largest_id_not_the_tokens(tokenizer):
    from tokenizers import models

    assert vocab_bound(tokenizer) == tokenizer.get_vocab_size() == 256 + len(SpecialTokens().all())
    gappy = Tokenizer(models.WordLevel({"a": 0, "b": 5, "[UNK]": 7}, unk_token="[UNK]"))
    assert gappy.get_vocab_size() == 3 and vocab_bound(gappy) == 8, "a model needs rows up to the largest id"


def test_a_missing_token_names_the_tokenizer_and_the_setting(tokenizer):
    with pytest.raises(BadInput, match=r"tok\.json has no '<eot>' token \(tokenizer\.special_tokens\.eos\)"):
        token_id(tokenizer, "<eot>", "tok.json", "tokenizer.special_tokens.eos")


def test_an_upstream_stage_that_kept_nothing_is_refused_naming_its_manifest(tmp_path):
    sources = {"web": SourceSpec(stage="filter")}
    manifest = {"counts": {"input": 37, "kept": 0, "rejected_by_rule": {"langid.language": 30, "gopher.min_words": 7}}}
    with pytest.raises(BadInput) as e:
        refuse_empty_sources(sources, {"filter": (tmp_path / "filter" / "manifest.json", manifest)}, "tokenize")
    assert str(e.value) == (f"tokenize.sources.web: the filter stage kept 0 of 37 documents (langid.language 30, "
                            f"gopher.min_words 7), so there is nothing to tokenize; see {tmp_path}/filter/manifest.json")
    emptied = {"counts": {"input": 0, "kept": 0, "removed_by_level": {"empty": 0, "exact": 0}}}
    with pytest.raises(BadInput, match=r"the dedup stage kept 0 of 0 documents \(its own input was empty\)"):
        refuse_empty_sources({"web": SourceSpec(stage="dedup")}, {"dedup": (tmp_path / "m.json", emptied)}, "tokenize")
    kept = {"counts": {"input": 37, "kept": 1}}
    refuse_empty_sources(sources, {"filter": (tmp_path / "m.json", kept)}, "tokenize")


def test_files_without_text_are_refused_before_datasets_reads_them(tokenizer, data_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    for name in ("empty.jsonl", "blank.txt", "none.parquet"):
        path = str(tmp_path / name)
        with pytest.raises(BadInput, match=rf"^cpt\.sources\.b: {path} holds no documents \(1 file\(s\), all empty\)$"):
            refuse_empty_sources({"a": peps(data_dir)["peps"], "b": SourceSpec(path=path)}, {}, "cpt")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": " \\n"}\n')
    with pytest.raises(BadInput, match=rf"cpt\.sources\.blank: all 2 documents of {tmp_path}/blank\.jsonl are blank"):
        encode_sources({**peps(data_dir, max_documents=30), "blank": SourceSpec(path=str(tmp_path / "blank.jsonl"))},
                       tokenizer, 0, tmp_path / "out", val_fraction=0.2, seed=0, spec=EncodeSpec(),
                       cache_dir=tmp_path / "cache", key="cpt")
    assert not (tmp_path / "out").exists()
