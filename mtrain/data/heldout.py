"""Held-out data for evaluation: the samples an evaluation reads, and the
tokenizer its greedy samples are shown with.

The held-out set is ``eval.path`` when given, else the ``valid`` part of
``data.path`` under ``eval.split`` (:mod:`mtrain.data.split`); with neither
there is nothing to evaluate. Every evaluation reads the same ``eval.steps``
global batches: batch ``k`` is the held-out global samples ``[k·B, (k+1)·B)``
(``B`` the global batch, in the held-out set's seeded order), cut over
data-parallel ranks and micro-batches exactly as a training step is
(:func:`~mtrain.data.gpt_dataset.batch_for_step`). Layouts with the same
global batch therefore evaluate the same micro-batches, and evaluations at
different steps are comparable.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from mtrain.data.blend import parse_blend
from mtrain.data.build import build_gpt_dataset, data_prefix, open_indexed
from mtrain.data.gpt_dataset import DataPosition, GPTDataset, Sample, batch_for_step
from mtrain.data.preprocess import tokenizer_path
from mtrain.data.tokenizer import Tokenizer


def build_heldout_dataset(data_cfg, eval_cfg, model_vocab_size: int,
                          cache_dir: str | os.PathLike | None = None) -> Optional[GPTDataset]:
    """The held-out samples (see the module doc); None when nothing is held out."""
    if eval_cfg.path is not None:
        return GPTDataset(open_indexed(eval_cfg.path, model_vocab_size, key="eval.path"),
                          data_cfg.seq_len, data_cfg.seed)
    if eval_cfg.split is None:
        return None
    return build_gpt_dataset(data_cfg, model_vocab_size, cache_dir, split=eval_cfg.split, part="valid")


class EvalBatches:
    """One rank's micro-batches of each of the ``steps`` held-out global batches."""

    def __init__(self, dataset: GPTDataset, steps: int, micro_batch: int, num_microbatches: int,
                 dp_rank: int, dp_size: int):
        self.dataset, self.steps = dataset, steps
        self.micro_batch, self.num_microbatches = micro_batch, num_microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch = micro_batch * num_microbatches * dp_size
        short = _shortfall(dataset, steps * self.global_batch)
        if short:
            raise ValueError(
                f"eval.steps={steps} global batches of {self.global_batch} samples need "
                f"{steps * self.global_batch} distinct held-out samples, but {short}: lower eval.steps or hold "
                f"out more (a larger valid share in eval.split, or a larger eval.path)")

    def __len__(self) -> int:
        return self.steps

    @property
    def samples(self) -> int:
        return self.steps * self.global_batch

    def batch(self, k: int) -> list[Sample]:
        """This rank's micro-batches (inputs, targets) of held-out batch ``k``."""
        if not 0 <= k < self.steps:
            raise IndexError(f"held-out batch {k} outside [0, {self.steps})")
        return batch_for_step(self.dataset, DataPosition(k * self.global_batch), self.global_batch,
                              self.dp_rank, self.dp_size, self.micro_batch, self.num_microbatches)


def _shortfall(dataset, needed: int) -> str:
    """Why the first ``needed`` samples of ``dataset`` would repeat some (an
    epoch is shorter), or "" when they are distinct."""
    if isinstance(dataset, GPTDataset):
        held = dataset.samples_per_epoch
        return "" if needed <= held else f"the held-out set holds {held} samples of data.seq_len + 1 tokens"
    counts = dataset.source_counts(needed)  # a blend: each source's share of them
    short = [f"{name} gives {counts[name]} of its {part.samples_per_epoch}"
             for name, part in zip(dataset.names, dataset.datasets) if counts[name] > part.samples_per_epoch]
    return "; ".join(f"held-out source {s} samples" for s in short)


def tokenizer_file(data_cfg, model_vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """``data.tokenizer``, else the tokenizer saved beside the dataset
    (``<prefix>.tokenizer.json``; for a blend, beside its first dataset)."""
    if data_cfg.tokenizer:
        return Path(data_cfg.tokenizer)
    if getattr(data_cfg, "blend", None) is not None:
        return tokenizer_path(parse_blend(data_cfg.blend)[0].path)
    return tokenizer_path(data_prefix(data_cfg, model_vocab_size, cache_dir))


def find_tokenizer(data_cfg, model_vocab_size: int,
                   cache_dir: str | os.PathLike | None = None) -> tuple[Optional[Tokenizer], Path]:
    """(the tokenizer, or None when its file does not exist; the file looked for)."""
    path = tokenizer_file(data_cfg, model_vocab_size, cache_dir)
    return (Tokenizer.from_file(path) if path.is_file() else None), path
