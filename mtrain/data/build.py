"""From the ``data`` config group to a GPT dataset: the one call the trainer makes."""
from __future__ import annotations

import os
from pathlib import Path

from mtrain.config.schema import DataConfig
from mtrain.data.demo import ensure_demo_dataset
from mtrain.data.gpt_dataset import GPTDataset
from mtrain.data.indexed import IndexedDataset


def default_cache_dir() -> Path:
    """``$MTRAIN_CACHE`` if set, else ``~/.cache/mtrain``; where the demo dataset is built."""
    return Path(os.environ.get("MTRAIN_CACHE", Path.home() / ".cache" / "mtrain"))


def build_gpt_dataset(cfg: DataConfig, model_vocab_size: int, cache_dir: str | os.PathLike | None = None) -> GPTDataset:
    """Open ``cfg.path`` (or build the demo corpus when it is null) and check it fits the model's vocabulary."""
    if cfg.path is None:
        prefix = ensure_demo_dataset(cache_dir or default_cache_dir(), vocab_size=model_vocab_size)
    else:
        prefix = cfg.path
    indexed = IndexedDataset(prefix)
    if indexed.vocab_size > model_vocab_size:
        raise ValueError(f"data.path {prefix} was tokenized with a vocabulary of {indexed.vocab_size} ids but "
                         f"model.vocab_size is {model_vocab_size}; raise model.vocab_size or re-tokenize")
    return GPTDataset(indexed, cfg.seq_len, cfg.seed)
