"""The global batch of every step: its size in sequences, the micro-batches
each data-parallel rank runs for it, and the batch-size ramp.

``train.global_batch_size`` is the batch in sequences, the same on any layout;
each data-parallel rank runs ``global_batch / (train.micro_batch_size * dp)``
micro-batches. Left null, the batch is ``micro_batch_size *
parallel.num_microbatches * dp`` as before (then it changes with dp).

With a ramp (``train.batch_ramp``: ``start_size``, ``increment``,
``ramp_samples``; Megatron's ``--rampup-batch-size``) the global batch of a step
is a function of the samples consumed before it, ``c``::

    levels = (global_batch_size - start_size) / increment
    size(c) = start_size + increment * min(levels, floor(c * levels / ramp_samples))

so the batch grows by ``increment`` every ``ramp_samples / levels`` samples and
is ``global_batch_size`` from ``c >= ramp_samples`` on. Integer arithmetic
only: every process, and a resumed run, gets the same size for the same
``c``. The data position (samples consumed) is therefore all a resume needs,
whatever the layout it resumes on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from mtrain.config.validate import ProblemList


class BatchConfigError(ProblemList):
    """The batch fields do not describe a global batch; ``errors`` holds every problem."""

    heading = "invalid global batch"


@dataclass(frozen=True)
class BatchRamp:
    """The global batch grows from ``start_size`` by ``increment`` over ``ramp_samples`` samples."""

    start_size: int
    increment: int
    ramp_samples: int


@dataclass(frozen=True)
class BatchSchedule:
    """Global batch per step (a function of the samples consumed) and the
    micro-batches per data-parallel rank it takes."""

    global_batch_size: int  # the full batch (after the ramp)
    micro_batch_size: int
    dp: int
    ramp: Optional[BatchRamp] = None

    @property
    def round_size(self) -> int:
        """Sequences one micro-batch on every data-parallel rank takes."""
        return self.micro_batch_size * self.dp

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per data-parallel rank at the full batch."""
        return self.global_batch_size // self.round_size

    @property
    def levels(self) -> int:
        """How many times the ramp grows the batch (0 without a ramp)."""
        if self.ramp is None:
            return 0
        return (self.global_batch_size - self.ramp.start_size) // self.ramp.increment

    def global_batch_at(self, consumed_samples: int) -> int:
        """The global batch of the step that starts after ``consumed_samples`` samples."""
        if consumed_samples < 0:
            raise ValueError(f"consumed samples cannot be negative, got {consumed_samples}")
        if self.ramp is None or consumed_samples >= self.ramp.ramp_samples:
            return self.global_batch_size
        level = consumed_samples * self.levels // self.ramp.ramp_samples
        return self.ramp.start_size + self.ramp.increment * min(level, self.levels)

    def microbatches_at(self, consumed_samples: int) -> int:
        """Micro-batches per data-parallel rank of the step starting at ``consumed_samples``."""
        return self.global_batch_at(consumed_samples) // self.round_size

    def sizes(self) -> list[int]:
        """Every global batch the schedule can give, ascending; the last is the full one."""
        if self.ramp is None:
            return [self.global_batch_size]
        return [self.ramp.start_size + self.ramp.increment * k for k in range(self.levels + 1)]

    def steps(self, num_steps: int, consumed_samples: int = 0) -> Iterator[tuple[int, int]]:
        """``(consumed samples before the step, its global batch)`` of ``num_steps`` steps."""
        for _ in range(num_steps):
            size = self.global_batch_at(consumed_samples)
            yield consumed_samples, size
            consumed_samples += size

    def ramp_steps(self) -> tuple[int, int]:
        """``(steps, samples)`` the ramp takes before the first full-batch step.

        Jumps over each level at once, so it costs one iteration per level
        however long the ramp."""
        if self.ramp is None:
            return 0, 0
        consumed, steps = 0, 0
        while consumed < self.ramp.ramp_samples:
            size = self.global_batch_at(consumed)
            level = (size - self.ramp.start_size) // self.ramp.increment
            # The first sample count of the next level: ceil((level + 1) * ramp_samples / levels).
            end = -(-(level + 1) * self.ramp.ramp_samples // self.levels)
            n = -(-(end - consumed) // size)
            consumed += n * size
            steps += n
        return steps, consumed

    def samples_after(self, num_steps: int) -> int:
        """Samples consumed by the first ``num_steps`` steps."""
        ramp_steps, ramp_samples = self.ramp_steps()
        if num_steps >= ramp_steps:
            return ramp_samples + (num_steps - ramp_steps) * self.global_batch_size
        return sum(size for _, size in self.steps(num_steps))


def _field(cfg, name: str, default=None):
    return getattr(cfg, name, default) if cfg is not None else default


def batch_errors(train, parallel, dp: int) -> list[str]:
    """Every problem of the batch fields (``train.global_batch_size``,
    ``train.batch_ramp``, ``parallel.num_microbatches``) with ``dp``
    data-parallel ranks, each naming the fields and the fix. The pipeline
    schedule's rules on the micro-batch counts are checked by the preflight."""
    mbs, gbs, nmb = train.micro_batch_size, train.global_batch_size, parallel.num_microbatches
    ramp = _field(train, "batch_ramp")
    start, inc, samples = (_field(ramp, k) for k in ("start_size", "increment", "ramp_samples"))
    errors = []
    if mbs < 1 or dp < 1:
        return errors  # reported with train.micro_batch_size / the layout
    round_size = mbs * dp
    if gbs is not None:
        if gbs < 1:
            errors.append(f"train.global_batch_size={gbs} must be at least 1 (or null: "
                          f"train.micro_batch_size x parallel.num_microbatches x dp)")
        elif gbs % round_size:
            lower, upper = gbs // round_size * round_size, (gbs // round_size + 1) * round_size
            errors.append(
                f"train.global_batch_size={gbs} is not a multiple of train.micro_batch_size x dp = "
                f"{mbs} x {dp} = {round_size}: every data-parallel rank runs whole micro-batches; use "
                + (f"{lower} or {upper}" if lower else f"{upper}")
                + " or change train.micro_batch_size")
        elif nmb is not None and nmb != gbs // round_size:
            errors.append(
                f"parallel.num_microbatches={nmb} conflicts with train.global_batch_size={gbs}, which gives "
                f"{gbs} / (train.micro_batch_size x dp = {mbs} x {dp}) = {gbs // round_size} micro-batches "
                f"per data-parallel rank: set parallel.num_microbatches=null to derive it (or "
                f"={gbs // round_size}), or leave train.global_batch_size null")
    if start is None:
        if inc is not None or samples is not None:
            errors.append("train.batch_ramp.increment and ramp_samples need train.batch_ramp.start_size "
                          "(the first step's global batch); set it, or set all three to null for no ramp")
        return errors
    if gbs is None:
        errors.append(f"train.batch_ramp.start_size={start} needs train.global_batch_size, the batch the "
                      f"ramp grows to; set it (the ramp's sizes are global batches in sequences)")
        return errors
    missing = [k for k, v in (("increment", inc), ("ramp_samples", samples)) if v is None]
    if missing:
        errors.append(f"train.batch_ramp.start_size={start} needs train.batch_ramp."
                      f"{' and '.join(missing)} too (Megatron's --rampup-batch-size <start> <increment> <samples>)")
        return errors
    bad = [f"train.batch_ramp.{k}={v}" for k, v in (("start_size", start), ("increment", inc),
                                                    ("ramp_samples", samples)) if v < 1]
    if bad:
        errors.append(f"{', '.join(bad)} must be at least 1")
        return errors
    if gbs < 1:
        return errors
    if start >= gbs:
        errors.append(f"train.batch_ramp.start_size={start} must be smaller than train.global_batch_size={gbs}, "
                      f"the batch it ramps up to (or set train.batch_ramp.start_size=null for no ramp)")
        return errors
    if (gbs - start) % inc:
        errors.append(f"train.global_batch_size - train.batch_ramp.start_size = {gbs} - {start} = {gbs - start} "
                      f"is not a multiple of train.batch_ramp.increment={inc}: the ramp must reach the global "
                      f"batch exactly; pick an increment dividing {gbs - start}")
    off = [f"train.batch_ramp.{k}={v}" for k, v in (("start_size", start), ("increment", inc)) if v % round_size]
    if off:
        errors.append(f"{' and '.join(off)} must be multiples of train.micro_batch_size x dp = {mbs} x {dp} = "
                      f"{round_size}, so that every global batch on the ramp is whole micro-batches on every "
                      f"data-parallel rank")
    return errors


def batch_schedule(train, parallel, dp: int) -> BatchSchedule:
    """The batch schedule of a config with ``dp`` data-parallel ranks; raises
    :class:`BatchConfigError` naming every problem."""
    errors = batch_errors(train, parallel, dp)
    if errors:
        raise BatchConfigError(errors)
    mbs = train.micro_batch_size
    gbs = train.global_batch_size
    if gbs is None:
        nmb = parallel.num_microbatches
        gbs = mbs * (1 if nmb is None else nmb) * dp
    ramp = _field(train, "batch_ramp")
    start = _field(ramp, "start_size")
    return BatchSchedule(gbs, mbs, dp, None if start is None else BatchRamp(start, ramp.increment, ramp.ramp_samples))
