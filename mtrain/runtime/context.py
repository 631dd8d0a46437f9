"""What one micro-batch's pass through a chunk carries besides its tensors.

A :class:`StepContext` is made per micro-batch and passed explicitly to every
step of its programs. It holds the loss scale (the main loss is divided by the
number of micro-batches, so auxiliary losses attached to activations must be
scaled alike), the sink that collects deferred weight-gradient work while a
backward defers it, the event log of the instruction now running, and the
auxiliary-loss values recorded for logging.

Autograd functions deep inside a module (a linear's backward) cannot take
arguments from the runtime, so the runtime *binds* the context while a step
runs (:meth:`StepContext.bound`) and such functions capture it in their
forward (:func:`current_step`). The captured context, not a global, decides
at backward time where the weight gradient goes, so it is right whichever
thread runs the backward.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch.utils.checkpoint import checkpoint

_BOUND: contextvars.ContextVar[Optional["StepContext"]] = contextvars.ContextVar("mtrain_step", default=None)


class EventLog:
    """Timestamps of compute and communication inside one instruction."""

    def __init__(self):
        self.events: list[tuple[float, str, str, str]] = []  # (time, side, kind, name)

    def add(self, side: str, kind: str, name: str) -> None:
        self.events.append((time.perf_counter(), side, kind, name))


class WeightGradSink:
    """Weight-gradient work queued by one backward pass, run later by its W."""

    def __init__(self):
        self.work: list[Callable[[], None]] = []

    @torch.no_grad()
    def run(self) -> None:
        # Outside autograd's backward, grad mode is on: the saved inputs still
        # require grad and the weight gradients must not build a graph.
        work, self.work = self.work, []
        for fn in work:
            fn()

    def __len__(self) -> int:
        return len(self.work)


@dataclass
class StepContext:
    """One micro-batch's context for the steps of its programs."""

    loss_scale: float = 1.0
    events: Optional[EventLog] = None
    weight_grads: Optional[WeightGradSink] = None  # set while a backward defers W
    aux_losses: list = field(default_factory=list)  # detached auxiliary-loss values, for logging

    @contextlib.contextmanager
    def bound(self) -> Iterator["StepContext"]:
        """Make this the context that autograd functions capture in their forward."""
        token = _BOUND.set(self)
        try:
            yield self
        finally:
            _BOUND.reset(token)

    @contextlib.contextmanager
    def deferring_weight_grads(self) -> Iterator[WeightGradSink]:
        """Within this block, backwards through this context's forward queue
        their weight gradients in the yielded sink instead of computing them."""
        previous, self.weight_grads = self.weight_grads, WeightGradSink()
        try:
            yield self.weight_grads
        finally:
            self.weight_grads = previous

    def log(self, side: str, kind: str, name: str) -> None:
        if self.events is not None:
            self.events.add(side, kind, name)


def current_step() -> Optional[StepContext]:
    """The context bound by the step now running its forward (None outside one)."""
    return _BOUND.get()


def maybe_recompute(enabled: bool, fn, *args):
    """``fn(*args)``; when ``enabled`` (and grad is on) its activations are not
    kept but recomputed in the backward. The recomputation runs inside the
    backward, in whatever thread runs it, so it re-binds the step context the
    forward ran in (deferred weight gradients then still reach its sink)."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    step = current_step()

    def bound(*a):
        if step is None:
            return fn(*a)
        with step.bound():
            return fn(*a)

    return checkpoint(bound, *args, use_reentrant=False)


# While one optimizer step's forwards and backwards run, no parameter changes
# (the optimizer runs after them), so copies derived from the weights (their
# FP8 blocks) can be made once and shared by every micro-batch. Process-wide,
# not a context variable: backwards and their recomputations run in
# autograd's threads.
_FIXED_WEIGHTS: Optional[dict] = None


@contextlib.contextmanager
def weights_fixed() -> Iterator[dict]:
    """Declare that no parameter changes inside this block: one step's
    micro-batches, forward and backward. Yields the cache that
    :func:`fixed_weights_cache` returns inside it, dropped when the block ends.
    A nested block shares the outer one's cache."""
    global _FIXED_WEIGHTS
    if _FIXED_WEIGHTS is not None:
        yield _FIXED_WEIGHTS
        return
    _FIXED_WEIGHTS = {}
    try:
        yield _FIXED_WEIGHTS
    finally:
        _FIXED_WEIGHTS = None


def fixed_weights_cache() -> Optional[dict]:
    """The cache of the enclosing :func:`weights_fixed` block; None outside one
    (then nothing derived from a weight may be kept)."""
    return _FIXED_WEIGHTS
