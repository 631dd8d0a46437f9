"""Weighted blends of datasets: one stream of global samples drawn from several
sources in fixed proportions (``data.blend``).

``data.blend`` is Megatron's string, ``"0.3 /data/a 0.7 /data/b"`` (weight,
prefix, weight, prefix, ...; one bare prefix is weight 1), or a list of
``{path, weight}`` mappings (an optional ``name`` labels the source in the
logs; by default the prefix's base name). Weights are normalised to sum to 1.

Which source serves global sample ``g``, and which of its samples, is a pure
function of ``g``. The interleave of one *block* of ``BLOCK`` positions is
computed once by greedy error minimisation (position ``i`` goes to the source
furthest behind its share, the largest ``w_d * (i + 1) - taken_d``, the first
on a tie), and every block repeats it::

    source(g) = pattern[g mod BLOCK]
    sample(g) = (g div BLOCK) * per_block[source(g)] + taken before g in its block

Source ``d``'s ``j``-th sample is ``datasets[d][j]``: a
:class:`~mtrain.data.gpt_dataset.GPTDataset` seeded with ``data.seed + d``,
shuffled per epoch and repeated epoch after epoch, so a small source with a
large weight is upsampled. Each block holds ``per_block[d]`` samples of
source ``d``, within one of ``BLOCK * w_d``, and every prefix of a block keeps
each source within about one sample of its share. Nothing but the data
position (samples consumed) is needed to resume, on any layout.

A "dataset" here is anything with ``__getitem__(global_index) -> (inputs,
targets)``; :class:`BlendedDataset` is one too.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from mtrain.config.validate import ProblemList
from mtrain.data.gpt_dataset import GPTDataset, Sample
from mtrain.data.indexed import IndexedDataset, bin_path, idx_path

BLOCK = 65536  # positions of the repeated interleave; a source needs a share of at least 1/BLOCK


class BlendError(ProblemList):
    """``data.blend`` cannot be used; ``errors`` holds every problem."""

    heading = "invalid data.blend"


@dataclass(frozen=True)
class BlendEntry:
    path: str
    weight: float  # normalised: the entries' weights sum to 1
    name: str


def _number(value) -> Optional[float]:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _raw_entries(spec) -> tuple[list[tuple[Any, Any, Optional[str]]], list[str]]:
    """``(weight, path, name)`` as written, and the problems of the form."""
    if isinstance(spec, str):
        tokens: Sequence = spec.split()
    elif isinstance(spec, Sequence) or (hasattr(spec, "__iter__") and not isinstance(spec, Mapping)):
        tokens = list(spec)
    else:
        return [], [f"data.blend={spec!r} must be a string \"<weight> <prefix> ...\" or a list of "
                    f"{{path, weight}} mappings"]
    if tokens and all(isinstance(t, Mapping) or hasattr(t, "keys") for t in tokens):
        out, errors = [], []
        for i, item in enumerate(tokens, 1):
            item = dict(item)
            unknown = sorted(set(item) - {"path", "weight", "name"})
            if unknown:
                errors.append(f"data.blend entry {i} has unknown keys {unknown}; an entry is {{path, weight}} "
                              f"(and an optional name)")
            if not item.get("path"):
                errors.append(f"data.blend entry {i} ({item}) has no path: give the indexed dataset's prefix")
                continue
            out.append((item.get("weight", 1.0), str(item["path"]), item.get("name")))
        return out, errors
    if any(isinstance(t, Mapping) or hasattr(t, "keys") for t in tokens):
        return [], ["data.blend mixes {path, weight} mappings with plain values: use one form"]
    if len(tokens) == 1:
        return [(1.0, str(tokens[0]), None)], []
    if len(tokens) % 2:
        return [], [f"data.blend={' '.join(map(str, tokens))!r} has {len(tokens)} items; it must alternate "
                    f"<weight> <prefix> (e.g. \"0.3 /data/a 0.7 /data/b\")"]
    return [(tokens[i], str(tokens[i + 1]), None) for i in range(0, len(tokens), 2)], []


def _names(paths: list[str], given: list[Optional[str]]) -> list[str]:
    names = [g if g else (os.path.basename(os.path.normpath(p)) or p) for p, g in zip(paths, given)]
    repeated = {n for n in names if names.count(n) > 1}
    return [f"{n}_{i}" if n in repeated else n for i, n in enumerate(names)]


def parse_blend(spec) -> list[BlendEntry]:
    """The entries of ``data.blend`` with normalised weights (empty for null or
    an empty blend); raises :class:`BlendError` naming every problem."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return []
    raw, errors = _raw_entries(spec)
    weights = []
    for i, (weight, path, _) in enumerate(raw, 1):
        value = _number(weight)
        if value is None:
            errors.append(f"data.blend entry {i} ({path}): weight {weight!r} is not a number")
        elif not math.isfinite(value) or value <= 0:
            errors.append(f"data.blend entry {i} ({path}) has weight {value!r}; weights must be positive and "
                          f"finite (leave a dataset out of the blend rather than give it weight 0)")
        weights.append(value)
    if errors:
        raise BlendError(errors)
    if not raw:
        raise BlendError(["data.blend lists no datasets; give at least one prefix, or set data.blend=null"])
    total = sum(weights)
    shares = [w / total for w in weights]
    small = [f"{path} ({share:.3g})" for (_, path, _), share in zip(raw, shares) if share * BLOCK < 1]
    if small:
        raise BlendError([f"data.blend: the normalised weights of {', '.join(small)} are below 1/{BLOCK}, too small "
                          f"to be drawn in a block of {BLOCK} samples; raise them or leave those datasets out"])
    paths = [path for _, path, _ in raw]
    names = _names(paths, [None if n is None else str(n) for _, _, n in raw])
    return [BlendEntry(p, s, n) for p, s, n in zip(paths, shares, names)]


def blend_errors(data) -> list[str]:
    """The config-time problems of ``data.blend`` (the form, the weights, and
    ``data.path`` set beside it); missing files and vocabularies are found when
    the datasets are opened (:func:`build_blended_dataset`)."""
    spec = getattr(data, "blend", None)
    if spec is None:
        return []
    errors = []
    if getattr(data, "path", None) is not None:
        errors.append(f"data.path={data.path} and data.blend are both set: use data.blend alone "
                      f"(a one-dataset blend is \"1 {data.path}\") or set data.blend=null")
    try:
        parse_blend(spec)
    except BlendError as e:
        errors += e.errors
    return errors


@functools.lru_cache(maxsize=8)
def _interleave(weights: tuple[float, ...], block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(source of each block position, its rank among the block's samples of
    that source, samples of each source per block)`` by greedy error minimisation."""
    taken = [0] * len(weights)
    pattern, rank = [0] * block, [0] * block
    for i in range(block):
        n = i + 1
        best, best_error = 0, weights[0] * n - taken[0]
        for d in range(1, len(weights)):
            error = weights[d] * n - taken[d]
            if error > best_error:
                best, best_error = d, error
        pattern[i], rank[i] = best, taken[best]
        taken[best] += 1
    return np.asarray(pattern, dtype=np.int32), np.asarray(rank, dtype=np.int64), np.asarray(taken, dtype=np.int64)


class BlendIndex:
    """Global sample -> (source, sample of that source) for normalised ``weights``."""

    def __init__(self, weights: Sequence[float], block: int = BLOCK):
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self.weights = tuple(float(w) / total for w in weights)
        self.block = block
        self.pattern, self.rank, self.per_block = _interleave(self.weights, block)
        empty = [d for d, n in enumerate(self.per_block) if n == 0]
        if empty:
            raise ValueError(f"blend sources {empty} get no sample in a block of {block}: weights too small")

    def locate(self, global_index: int) -> tuple[int, int]:
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        block, offset = divmod(global_index, self.block)
        source = int(self.pattern[offset])
        return source, block * int(self.per_block[source]) + int(self.rank[offset])

    def counts(self, num_samples: int) -> list[int]:
        """Samples of each source among global samples ``[0, num_samples)``."""
        blocks, rest = divmod(num_samples, self.block)
        partial = np.bincount(self.pattern[:rest], minlength=len(self.weights))
        return [int(v) for v in blocks * self.per_block + partial]


class BlendedDataset:
    """Global sample ``g`` is sample ``j`` of source ``d`` with ``(d, j) =
    index.locate(g)`` (see the module doc). ``datasets`` are any objects with
    ``__getitem__(index) -> (inputs, targets)``."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], names: Optional[Sequence[str]] = None,
                 block: int = BLOCK):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.index = BlendIndex(weights, block)
        self.weights = self.index.weights
        self.names = list(names) if names is not None else [f"source_{d}" for d in range(len(datasets))]

    def __len__(self) -> int:
        return len(self.datasets)

    def __getitem__(self, global_index: int) -> Sample:
        source, sample = self.index.locate(global_index)
        return self.datasets[source][sample]

    def source_of(self, global_index: int) -> str:
        return self.names[self.index.locate(global_index)[0]]

    def source_counts(self, num_samples: int) -> dict[str, int]:
        """Name -> samples of that source among the first ``num_samples`` global samples."""
        return dict(zip(self.names, self.index.counts(num_samples)))

    def summary(self, total_samples: int) -> list[str]:
        """One line per source: weight, size, and what ``total_samples`` global
        samples (a run's planned total) draw from it."""
        lines = []
        for name, weight, dataset, drawn in zip(self.names, self.weights, self.datasets,
                                                self.index.counts(total_samples)):
            per_epoch = getattr(dataset, "samples_per_epoch", None)
            prefix = getattr(getattr(dataset, "indexed", None), "prefix", None)
            size = f", {per_epoch} samples per epoch" if per_epoch else ""
            epochs = f" ({drawn / per_epoch:.3g} epochs)" if per_epoch else ""
            lines.append(f"{name}: weight {weight:.4f}{size}{f' ({prefix})' if prefix else ''}; "
                         f"{drawn} of the run's {total_samples} samples{epochs}")
        return lines


def build_blended_dataset(data, model_vocab_size: int,
                          token_range: Optional[Callable[[IndexedDataset], Optional[tuple[int, int]]]] = None
                          ) -> BlendedDataset:
    """Open every dataset of ``data.blend`` (each a :class:`GPTDataset` of
    ``data.seq_len``, seeded ``data.seed + its position``) and blend them;
    raises :class:`BlendError` naming every missing prefix, vocabulary larger
    than ``model.vocab_size`` and dataset too short for one sample.
    ``token_range(indexed)``, when given, limits each source to a token range
    (one part of a train/valid split)."""
    errors = blend_errors(data)
    if errors:
        raise BlendError(errors)
    entries = parse_blend(data.blend)
    datasets = []
    for d, entry in enumerate(entries):
        missing = [str(p) for p in (bin_path(entry.path), idx_path(entry.path)) if not p.is_file()]
        if missing:
            errors.append(f"data.blend dataset {entry.name}: no indexed dataset at prefix {entry.path} "
                          f"({' and '.join(missing)} not found); build it with tools/preprocess_data.py "
                          f"or fix the path")
            continue
        try:
            indexed = IndexedDataset(entry.path)
            if indexed.vocab_size > model_vocab_size:
                errors.append(f"data.blend dataset {entry.name} ({entry.path}) was tokenized with a vocabulary "
                              f"of {indexed.vocab_size} ids but model.vocab_size is {model_vocab_size}; raise "
                              f"model.vocab_size or re-tokenize it")
                continue
            tokens = token_range(indexed) if token_range is not None else None
            datasets.append(GPTDataset(indexed, data.seq_len, data.seed + d, tokens))
        except ValueError as e:  # a corrupt dataset, or fewer tokens than one sample
            errors.append(f"data.blend dataset {entry.name}: {e}")
    if errors:
        raise BlendError(errors)
    return BlendedDataset(datasets, [e.weight for e in entries], [e.name for e in entries])
