"""Build the tokenizer a stage asks for: train byte-level BPE, a 256-byte vocabulary, or load a file."""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.errors import BadInput, check, choice


class TokenizerKind(enum.StrEnum):
    bpe = "bpe"  # train byte-level BPE on the training split
    bytes = "bytes"  # 256 byte symbols plus the special tokens, no merges (character-level work)
    file = "file"  # an existing tokenizer.json


@dataclass
class SpecialTokens:
    bos: str = "<s>"
    eos: str = "</s>"  # placed after every document in the token shards
    pad: str = "<pad>"
    # Markers the chat templates of SFT use (ChatML and Llama-2 style); special, so never split.
    chat: list[str] = field(default_factory=lambda: ["<|im_start|>", "<|im_end|>", "[INST]", "[/INST]",
                                                     "<<SYS>>", "<</SYS>>"])

    def all(self) -> list[str]:
        return [self.bos, self.eos, self.pad, *self.chat]


@dataclass
class TokenizerSpec:
    kind: TokenizerKind = TokenizerKind.bpe
    vocab_size: int = 4096  # bpe: target size including bytes and special tokens
    min_frequency: int = 2  # bpe: a pair must occur this often to be merged
    path: Optional[str] = None  # file: the tokenizer.json to use
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)

    def __post_init__(self):
        self.kind = choice(TokenizerKind, self.kind, "kind")
        check(self.vocab_size >= 1, "vocab_size", self.vocab_size, "at least 1")


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    # add_prefix_space=False and no normalizer keep decode(encode(x)) == x for any text.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, special_tokens: list[str],
              length: Optional[int] = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer; ids of ``special_tokens`` come first, in order."""
    floor = 256 + len(special_tokens)
    if vocab_size < floor:
        raise BadInput(f"tokenizer.vocab_size={vocab_size} is below {floor} (256 bytes + {len(special_tokens)} "
                       f"special tokens); raise it or use tokenizer=bytes")
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def byte_tokenizer(special_tokens: list[str]) -> Tokenizer:
    """Ids 0..255 are the bytes 0..255; the special tokens follow."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the printable stand-ins ByteLevel uses for bytes
    by_byte = sorted(alphabet, key=lambda ch: _BYTE_OF[ch])
    vocab = {ch: i for i, ch in enumerate(by_byte)}
    tokenizer = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tokenizer.add_special_tokens(special_tokens)
    return tokenizer


def _bytes_to_unicode() -> dict[str, int]:
    # GPT-2's reversible byte <-> printable-character table, which ByteLevel implements.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _bytes_to_unicode()


def vocab_bound(tokenizer: Tokenizer) -> int:
    """One past the largest token id: the rows a model's embedding needs (a given tokenizer.json may leave gaps)."""
    return max(tokenizer.get_vocab().values()) + 1


def token_id(tokenizer: Tokenizer, token: str, where: object, key: str) -> int:
    """The id of ``token``, or a BadInput naming the tokenizer (``where``) and the setting that chose the token."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise BadInput(f"{where} has no '{token}' token ({key})")
    return found


def load_tokenizer_file(path: str, special_tokens: list[str]) -> Tokenizer:
    if not os.path.isfile(path):
        raise BadInput(f"tokenizer.path: {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:
        raise BadInput(f"tokenizer.path: {path} is not a tokenizers JSON file ({str(e).splitlines()[0]})") from e
    missing = [t for t in special_tokens if tokenizer.token_to_id(t) is None]
    if missing:
        raise BadInput(f"tokenizer.path: {path} lacks the special tokens {missing}; "
                       f"set tokenizer.special_tokens to tokens it has")
    return tokenizer


def requested_vocab_size(spec: TokenizerSpec) -> Optional[int]:
    """The vocabulary size ``spec`` asks for: tokenizer.vocab_size for BPE; None for bytes and file, which ignore it."""
    return spec.vocab_size if spec.kind is TokenizerKind.bpe else None


def vocab_shortfall(spec: TokenizerSpec, tokenizer: Tokenizer) -> Optional[str]:
    """Why a trained BPE vocabulary is smaller than tokenizer.vocab_size, or None when it is not.

    BPE stops merging when no pair of tokens occurs min_frequency times any more, so a small corpus
    yields fewer tokens than asked for; the model's embedding follows the tokens there are.
    """
    requested, got = requested_vocab_size(spec), tokenizer.get_vocab_size()
    if requested is None or got >= requested:
        return None
    n_special = len(spec.special_tokens.all())
    return (f"tokenizer.vocab_size={requested} asked, got {got} tokens (256 bytes + {n_special} special + "
            f"{got - 256 - n_special} merges): the training split has too few distinct pairs occurring at least "
            f"tokenizer.min_frequency={spec.min_frequency} times; add text or lower tokenizer.vocab_size")


def build_tokenizer(spec: TokenizerSpec, train_texts: Iterable[str], length: Optional[int] = None) -> Tokenizer:
    specials = spec.special_tokens.all()
    if spec.kind is TokenizerKind.bpe:
        return train_bpe(train_texts, spec.vocab_size, spec.min_frequency, specials, length=length)
    if spec.kind is TokenizerKind.bytes:
        return byte_tokenizer(specials)
    if spec.path is None:
        raise BadInput("tokenizer.kind=file needs tokenizer.path=<tokenizer.json>")
    return load_tokenizer_file(spec.path, specials)
