"""Byte-level BPE tokenizer: a thin wrapper over HuggingFace ``tokenizers``.

Byte-level means every byte has a token, so any text encodes and decodes back
exactly. Two special tokens are always present: EOS (appended after every
document by the preprocessor) and PAD.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# 256 byte tokens plus the special tokens: the smallest vocabulary that can encode anything.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
    def __init__(self, hf_tokenizer: HFTokenizer) -> None:
        self._tok = hf_tokenizer
        eos = hf_tokenizer.token_to_id(EOS_TOKEN)
        pad = hf_tokenizer.token_to_id(PAD_TOKEN)
        if eos is None or pad is None:
            raise ValueError(f"tokenizer lacks the special tokens {EOS_TOKEN!r} and {PAD_TOKEN!r}")
        self.eos_id: int = eos
        self.pad_id: int = pad

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a ``tokenizer.json`` (as written by :meth:`save`)."""
        return cls(HFTokenizer.from_file(os.fspath(path)))

    @classmethod
    def from_str(cls, json_text: str) -> "Tokenizer":
        """Rebuild from :meth:`to_str` (how worker processes receive the tokenizer)."""
        return cls(HFTokenizer.from_str(json_text))

    def to_str(self) -> str:
        return self._tok.to_str()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train a byte-level BPE on ``texts``; the same texts give the same tokenizer."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens), "
                             f"got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def train_from_files(cls, paths: Sequence[str | os.PathLike], vocab_size: int) -> "Tokenizer":
        return cls.train((_read_text(p) for p in paths), vocab_size)

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save(os.fspath(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _read_text(path: str | os.PathLike) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
