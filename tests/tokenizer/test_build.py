"""Tokenizers: lossless round trips on real multilingual pages, byte ids, special tokens, bad specs."""
from __future__ import annotations

import gzip

import pytest

from pipeline.errors import BadInput
from pipeline.tokenizer.build import (SpecialTokens, TokenizerKind, TokenizerSpec, build_tokenizer, byte_tokenizer,
                                      load_tokenizer_file, train_bpe, vocab_shortfall)
from pipeline.tokenizer.encode import _Encoder

PAGES = ["gmw", "hukumusume", "qq", "lemonde-1", "folha", "heise"]  # Chinese, Japanese, French, Portuguese, German


@pytest.fixture(scope="module")
def multilingual_pages(data_dir) -> list[str]:
    root = data_dir / "crawl" / "html" / "mozilla_readability"
    texts = [gzip.open(root / page / "source.html.gz").read().decode("utf-8", errors="replace") for page in PAGES]
    assert any(ord(ch) > 0x3000 for ch in texts[0]), "expected CJK text in the gmw page"
    return texts


@pytest.fixture(scope="module")
def shakespeare(data_dir) -> list[str]:
    text = (data_dir / "pretrain" / "tinyshakespeare" / "input.txt").read_text()
    return [p for p in text.split("\n\n") if p.strip()][:3000]


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return train_bpe(shakespeare, vocab_size=600, min_frequency=2, special_tokens=SpecialTokens().all())


def test_bpe_round_trips_real_pages_it_never_saw(bpe, multilingual_pages, shakespeare):
    for text in multilingual_pages + shakespeare[:50]:
        ids = bpe.encode(text, add_special_tokens=False).ids
        assert bpe.decode(ids, skip_special_tokens=False) == text


def test_bpe_learned_merges_and_compresses_english(bpe, shakespeare):
    assert bpe.get_vocab_size() == 600
    text = "\n\n".join(shakespeare[:200])
    assert len(text.encode()) / len(bpe.encode(text).ids) > 2.0, "BPE should beat one token per byte on its own data"


def test_special_tokens_take_the_first_ids_in_order(bpe):
    specials = SpecialTokens().all()
    assert [bpe.token_to_id(t) for t in specials] == list(range(len(specials)))


def test_byte_tokenizer_ids_are_the_utf8_bytes(multilingual_pages):
    tok = byte_tokenizer(SpecialTokens().all())
    assert tok.get_vocab_size() == 256 + len(SpecialTokens().all())
    for text in multilingual_pages:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_special_token_strings_in_a_corpus_are_text_not_eos(bpe):
    encoder = _Encoder(bpe.to_str(), eos_id=bpe.token_to_id("</s>"))
    (ids,) = encoder({"text": ["a page that writes </s> and <|im_end|> literally"]})["ids"]
    eos = bpe.token_to_id("</s>")
    assert list(ids).count(eos) == 1 and ids[-1] == eos, "only the appended end-of-document token is EOS"
    assert bpe.decode(list(ids[:-1]), skip_special_tokens=False) == "a page that writes </s> and <|im_end|> literally"


def test_vocab_below_bytes_plus_specials_is_refused():
    with pytest.raises(BadInput, match="tokenizer.vocab_size=100 is below 265"):
        train_bpe(["abc"], vocab_size=100, min_frequency=1, special_tokens=SpecialTokens().all())


def test_a_corpus_too_small_for_the_asked_vocabulary_is_reported(shakespeare, bpe):
    spec = TokenizerSpec(vocab_size=50_000)
    small = build_tokenizer(spec, shakespeare[:20])
    got = small.get_vocab_size()
    assert 265 < got < 50_000, "BPE stops when no pair is frequent enough"
    assert vocab_shortfall(spec, small) == (
        f"tokenizer.vocab_size=50000 asked, got {got} tokens (256 bytes + 9 special + {got - 265} merges): the "
        f"training split has too few distinct pairs occurring at least tokenizer.min_frequency=2 times; add text "
        f"or lower tokenizer.vocab_size")
    assert vocab_shortfall(TokenizerSpec(vocab_size=600), bpe) is None, "the size asked for was reached"
    assert vocab_shortfall(TokenizerSpec(kind=TokenizerKind.bytes, vocab_size=50_000),
                           byte_tokenizer(SpecialTokens().all())) is None, "bytes ignores vocab_size"


def test_tokenizer_file_is_loaded_and_checked(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))
    spec = TokenizerSpec(kind=TokenizerKind.file, path=str(path))
    assert build_tokenizer(spec, []).to_str() == bpe.to_str()
    with pytest.raises(BadInput, match="lacks the special tokens \\['<bos>'\\]"):
        load_tokenizer_file(str(path), ["<bos>"])
    with pytest.raises(BadInput, match="does not exist"):
        build_tokenizer(TokenizerSpec(kind=TokenizerKind.file, path=str(tmp_path / "nope.json")), [])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadInput, match="is not a tokenizers JSON file"):
        build_tokenizer(TokenizerSpec(kind=TokenizerKind.file, path=str(tmp_path / "bad.json")), [])
