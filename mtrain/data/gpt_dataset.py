"""GPT training samples over an indexed dataset, and their deterministic distribution.

Sample ``j`` of the unshuffled order is the ``seq_len + 1`` tokens of the flat
token stream starting at ``j * seq_len`` (from the start of the dataset's token
range, when it holds one part of a split; samples overlap by one token, so every
token but the first is a target exactly once per epoch). Documents are not
padded: a sample crosses document boundaries, which the EOS ids appended by the
preprocessor mark.

Global sample ``g`` (counted from the start of training, across epochs) is
``perm(epoch)[g % n]`` with ``epoch = g // n`` and ``n`` samples per epoch;
``perm(epoch)`` is ``numpy.random.default_rng([seed, epoch]).permutation(n)``.
A training step consumes the next ``global_batch`` global samples, so the only
state needed to resume is the number of samples consumed (``DataPosition``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from mtrain.data.indexed import IndexedDataset

Sample = tuple[torch.Tensor, torch.Tensor]


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Order in which epoch ``epoch`` visits the ``num_samples`` samples."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class GPTDataset:
    """Infinite, seeded stream of (input ids, target ids) pairs of length ``seq_len``."""

    def __init__(self, indexed: IndexedDataset, seq_len: int, seed: int,
                 token_range: Optional[tuple[int, int]] = None) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.indexed = indexed
        self.seq_len = seq_len
        self.seed = seed
        # Samples come from the tokens [start, end) only (one part of a split, mtrain.data.split).
        self.start, self.end = token_range if token_range is not None else (0, indexed.num_tokens)
        self.samples_per_epoch = max(self.end - self.start - 1, 0) // seq_len
        if self.samples_per_epoch == 0:
            where = f"dataset {indexed.prefix}" + (f" (tokens {self.start}..{self.end})" if token_range else "")
            raise ValueError(f"{where} has {self.end - self.start} tokens, "
                             f"fewer than one sample of seq_len + 1 = {seq_len + 1}")
        self._cached_epoch = -1
        self._cached_perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        # Steps walk through epochs in order, so one cached permutation suffices.
        if epoch != self._cached_epoch:
            self._cached_perm = epoch_permutation(self.samples_per_epoch, self.seed, epoch)
            self._cached_epoch = epoch
        return self._cached_perm

    def sample_tokens(self, unshuffled_index: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of sample ``unshuffled_index`` in stream order."""
        return self.indexed.tokens(self.start + unshuffled_index * self.seq_len, self.seq_len + 1)

    def shuffled_index(self, global_index: int) -> int:
        """Which unshuffled sample global sample ``global_index`` is."""
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        epoch, within = divmod(global_index, self.samples_per_epoch)
        return int(self._permutation(epoch)[within])

    def __getitem__(self, global_index: int) -> Sample:
        tokens = torch.from_numpy(self.sample_tokens(self.shuffled_index(global_index)).astype(np.int64))
        return tokens[:-1], tokens[1:]

    def __iter__(self) -> Iterator[Sample]:
        global_index = 0
        while True:
            yield self[global_index]
            global_index += 1


@dataclass(frozen=True)
class DataPosition:
    """Number of global samples consumed so far; all a resume needs."""

    consumed_samples: int = 0

    def advance(self, num_samples: int) -> "DataPosition":
        return DataPosition(self.consumed_samples + num_samples)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DataPosition":
        return cls(int(state["consumed_samples"]))


def rank_sample_indices(position: DataPosition, global_batch: int, dp_rank: int, dp_size: int,
                        micro_batch: int, num_microbatches: int) -> list[list[int]]:
    """Global sample indices of this rank's micro-batches for the step starting at ``position``.

    The step's global batch is the samples ``[c, c + global_batch)`` with
    ``c = position.consumed_samples``. It is cut into ``dp_size`` contiguous
    blocks, block ``r`` going to dp rank ``r``, and each block into
    ``num_microbatches`` contiguous micro-batches. Concatenating all ranks'
    micro-batches in (rank, micro-batch) order therefore gives the global batch
    in order, whatever ``dp_size``: dp=1 with 2k micro-batches and dp=2 with k
    micro-batches train on the same samples.
    """
    if global_batch != micro_batch * num_microbatches * dp_size:
        raise ValueError(f"global_batch ({global_batch}) must equal micro_batch ({micro_batch}) x "
                         f"num_microbatches ({num_microbatches}) x dp_size ({dp_size})")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    start = position.consumed_samples + dp_rank * micro_batch * num_microbatches
    return [list(range(start + m * micro_batch, start + (m + 1) * micro_batch)) for m in range(num_microbatches)]


def batch_for_step(dataset: GPTDataset, position: DataPosition, global_batch: int, dp_rank: int,
                   dp_size: int, micro_batch: int, num_microbatches: int) -> list[Sample]:
    """This rank's micro-batches (inputs, targets), each ``[micro_batch, seq_len]`` int64."""
    batches = []
    for indices in rank_sample_indices(position, global_batch, dp_rank, dp_size, micro_batch, num_microbatches):
        samples = [dataset[i] for i in indices]
        batches.append((torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])))
    return batches


class StepLoader:
    """Hands one rank its micro-batches step after step and remembers the position.

    ``dataset`` is anything with ``__getitem__(global_index) -> (inputs,
    targets)`` (a :class:`GPTDataset`, a blend). ``schedule``, when given, has
    ``global_batch_at(consumed_samples)`` (a
    :class:`~mtrain.data.batching.BatchSchedule`): each step's global batch
    then follows it (a batch-size ramp) and the step runs ``global_batch /
    (micro_batch * dp_size)`` micro-batches; without it every step runs
    ``num_microbatches``.

    Save ``state_dict()`` with a checkpoint; ``load_state_dict`` continues with
    exactly the samples that would have come next.
    """

    def __init__(self, dataset: GPTDataset, micro_batch: int, num_microbatches: int, dp_rank: int,
                 dp_size: int, position: DataPosition = DataPosition(), schedule=None) -> None:
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.num_microbatches = num_microbatches
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.position = position
        self.schedule = schedule

    @property
    def global_batch(self) -> int:
        """The global batch of the next step."""
        if self.schedule is not None:
            return self.schedule.global_batch_at(self.position.consumed_samples)
        return self.micro_batch * self.num_microbatches * self.dp_size

    def next_step(self) -> list[Sample]:
        global_batch = self.global_batch
        batches = batch_for_step(self.dataset, self.position, global_batch, self.dp_rank, self.dp_size,
                                 self.micro_batch, global_batch // (self.micro_batch * self.dp_size))
        self.position = self.position.advance(global_batch)
        return batches

    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition.from_state_dict(state)
