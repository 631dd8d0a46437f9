"""A chunk's forward as a program of compute and communication steps.

A model chunk (the layers of one pipeline stage) is written as a list of
steps: :class:`Compute` (ordinary autograd code on a dict of named tensors)
and :class:`Comm` (an exchange, e.g. the MoE dispatch or combine all-to-all,
whose gradient is its transpose). The same program runs three ways:

- ``run_plain``: sequentially under autograd (communication synchronous). This
  is the reference path and what a non-overlapped forward uses.
- ``record_forward``: step by step on *detached* inputs that keep
  ``requires_grad``, keeping each step's inputs and outputs, so that the
  backward can later be replayed step by step (``backward_steps``).
- as generators that *yield* at every started exchange, so that
  :func:`run_overlapped` can run the forward of one micro-batch and the
  backward of another together: while one side's exchange is in flight (started,
  not waited), the other side computes.

The math is the same in all three; only the order of independent work differs,
so losses and gradients are bit-identical with overlap on and off.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from mtrain.model.moe.dispatch import CommOp, Pending, communicate

State = dict  # name -> Tensor (or None)


@dataclass
class Compute:
    """``fn(state, ctx) -> new state`` (only the returned keys survive)."""

    fn: Callable[[State, dict], State]
    name: str = "compute"


@dataclass
class Comm:
    """Exchange ``state[key]`` with the CommOp found at ``ctx[op]``."""

    key: str
    op: str
    name: str = "comm"


Program = list  # of Compute | Comm


def run_plain(program: Program, state: State, ctx: dict) -> State:
    for step in program:
        if isinstance(step, Compute):
            state = step.fn(state, ctx)
        else:
            state = dict(state)
            state[step.key] = communicate(state[step.key], ctx[step.op])
    return state


def _detach(state: State) -> State:
    """Cut the autograd graph at a step boundary. Every floating-point state
    tensor is an activation whose gradient the previous step needs."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().requires_grad_(True)
        out[k] = v
    return out


@dataclass
class StepRecord:
    step: object
    inputs: State
    outputs: State


@dataclass
class Recording:
    """What a step-by-step forward kept for its backward."""

    records: list = field(default_factory=list)
    ctx: dict = field(default_factory=dict)


class EventLog:
    """Timestamps of compute and communication inside overlapped pairs."""

    def __init__(self):
        self.events: list[tuple[float, str, str, str]] = []  # (time, side, kind, name)

    def add(self, side: str, kind: str, name: str) -> None:
        self.events.append((time.perf_counter(), side, kind, name))


def forward_steps(program: Program, state: State, ctx: dict, rec: Recording,
                  log: Optional[EventLog] = None, side: str = "F") -> Iterator[Pending]:
    """Generator running the forward step by step; yields at each started exchange.
    Returns the final state (StopIteration.value)."""
    rec.ctx = ctx
    for step in program:
        if isinstance(step, Compute):
            inputs = _detach(state)
            if log:
                log.add(side, "compute_start", step.name)
            with torch.enable_grad():
                state = step.fn(inputs, ctx)
            if log:
                log.add(side, "compute_end", step.name)
            rec.records.append(StepRecord(step, inputs, state))
        else:
            op: CommOp = ctx[step.op]
            if log:
                log.add(side, "comm_start", step.name)
            pending = op.start(state[step.key].detach())
            yield pending
            state = dict(state)
            state[step.key] = pending.wait()
            if log:
                log.add(side, "comm_wait", step.name)
            rec.records.append(StepRecord(step, {}, {}))
    return state


def record_forward(program: Program, state: State, ctx: dict, rec: Recording) -> State:
    gen = forward_steps(program, state, ctx, rec)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def _accumulate(grads: State, key: str, g: Optional[torch.Tensor]) -> None:
    if g is None:
        return
    grads[key] = g if grads.get(key) is None else grads[key] + g


def backward_steps(rec: Recording, grads: State, log: Optional[EventLog] = None,
                   side: str = "B") -> Iterator[Pending]:
    """Generator replaying the backward step by step (yields at each started
    exchange). ``grads`` maps names of the final state to their gradients;
    returns the gradients of the initial state's tensors."""
    grads = dict(grads)
    for record in reversed(rec.records):
        step = record.step
        if isinstance(step, Compute):
            outs, gouts = [], []
            for k, v in record.outputs.items():
                g = grads.pop(k, None)
                if isinstance(v, torch.Tensor) and v.requires_grad and g is not None:
                    outs.append(v)
                    gouts.append(g)
            if log:
                log.add(side, "compute_start", step.name)
            if outs:
                torch.autograd.backward(outs, gouts)
            if log:
                log.add(side, "compute_end", step.name)
            for k, v in record.inputs.items():
                if isinstance(v, torch.Tensor) and v.requires_grad:
                    _accumulate(grads, k, v.grad)
            record.inputs, record.outputs = {}, {}  # free activations
        else:
            g = grads.pop(step.key, None)
            if g is None:
                continue
            if log:
                log.add(side, "comm_start", step.name)
            pending = rec.ctx[step.op].start_transpose(g.contiguous())
            yield pending
            grads[step.key] = pending.wait()
            if log:
                log.add(side, "comm_wait", step.name)
    return grads


def drain(gen: Iterator[Pending]):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def run_overlapped(forward_gen: Iterator[Pending], backward_gen: Iterator[Pending]):
    """Run two step generators together: each runs until it has started an
    exchange, then the other runs while that exchange is in flight. Returns
    (forward result, backward result)."""
    gens = {"F": forward_gen, "B": backward_gen}
    results: dict = {}
    turn = "F"
    while gens:
        gen = gens.get(turn)
        if gen is not None:
            try:
                next(gen)
            except StopIteration as stop:
                results[turn] = stop.value
                del gens[turn]
        other = "B" if turn == "F" else "F"
        turn = other if other in gens else turn
    return results["F"], results["B"]
