"""From the ``data`` config group to a GPT dataset: the one call the trainer makes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from mtrain.config.schema import DataConfig
from mtrain.data.blend import build_blended_dataset
from mtrain.data.demo import ensure_demo_dataset
from mtrain.data.gpt_dataset import GPTDataset
from mtrain.data.indexed import IndexedDataset
from mtrain.data.split import part_token_range


def default_cache_dir() -> Path:
    """``$MTRAIN_CACHE`` if set, else ``~/.cache/mtrain``; where the demo dataset is built."""
    return Path(os.environ.get("MTRAIN_CACHE", Path.home() / ".cache" / "mtrain"))


def data_prefix(cfg: DataConfig, model_vocab_size: int, cache_dir: str | os.PathLike | None = None) -> str:
    """``cfg.path``, or the demo corpus's prefix (built on first use) when it is null."""
    if cfg.path is None:
        return ensure_demo_dataset(cache_dir or default_cache_dir(), vocab_size=model_vocab_size)
    return cfg.path


def open_indexed(prefix: str | os.PathLike, model_vocab_size: int, key: str = "data.path") -> IndexedDataset:
    """The indexed dataset at ``prefix`` (the value of config field ``key``), checked against the model's vocabulary."""
    indexed = IndexedDataset(prefix)
    if indexed.vocab_size > model_vocab_size:
        raise ValueError(f"{key} {prefix} was tokenized with a vocabulary of {indexed.vocab_size} ids but "
                         f"model.vocab_size is {model_vocab_size}; raise model.vocab_size or re-tokenize")
    return indexed


def build_gpt_dataset(cfg: DataConfig, model_vocab_size: int, cache_dir: str | os.PathLike | None = None,
                      split: Optional[str] = None, part: str = "train") -> GPTDataset:
    """Open ``cfg.path`` (or build the demo corpus when it is null) and check it fits the model's vocabulary.
    With ``split`` (``eval.split``, see :mod:`mtrain.data.split`) the samples come from ``part``'s documents only.
    With ``cfg.blend``, the blend of its datasets (:mod:`mtrain.data.blend`), each split alike."""
    if getattr(cfg, "blend", None) is not None:
        return build_blended_dataset(cfg, model_vocab_size, lambda ix: part_token_range(ix, split, part))
    indexed = open_indexed(data_prefix(cfg, model_vocab_size, cache_dir), model_vocab_size)
    return GPTDataset(indexed, cfg.seq_len, cfg.seed, part_token_range(indexed, split, part))
