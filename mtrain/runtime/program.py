"""Programs of compute and exchange steps over typed carries.

A layer (or a whole model chunk) is written as steps: :class:`Compute`
(ordinary autograd code taking and returning a *carry*) and :class:`Exchange`
(an exchange of one carry field, e.g. the MoE dispatch or combine all-to-all,
whose gradient is its transpose). A carry is a small dataclass naming what
flows between the steps of one layer kind (an MoE carry holds the hidden
state, the normed input, the rows on the wire and the dispatch
plan). The same program runs three ways:

- :func:`run_plain`: sequentially under autograd, exchanges synchronous. This
  is what a module's ``forward()`` runs, and the reference.
- :func:`forward_steps` / :func:`backward_steps`: step by step on *detached*
  carries, recording each step's input and output carry so that the backward
  is replayed step by step; generators that *yield* at every started exchange.
- :func:`run_overlapped`: the forward of one micro-batch and the backward of
  another together: while one side's exchange is in flight, the other computes.

The math is the same in all three; only the order of independent work differs,
so losses and gradients are bit-identical with overlap on and off. The runtime
handles carries generically: every tensor field that requires grad is an
activation, detached at a step boundary, its gradient carried back by field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch.autograd.graph import _engine_run_backward

from mtrain.runtime.comm import CommOp, Pending, communicate
from mtrain.runtime.context import StepContext


@dataclass
class Carry:
    """Base of the dataclasses that flow between steps."""

    def replace(self, **changes) -> "Carry":
        return dataclasses.replace(self, **changes)

    def activations(self) -> dict[str, torch.Tensor]:
        """Tensor fields that require grad: the ones a backward flows through."""
        return {f.name: v for f in dataclasses.fields(self)
                if isinstance(v := getattr(self, f.name), torch.Tensor) and v.requires_grad}

    def scalars(self) -> dict[str, torch.Tensor]:
        """One-element tensor fields (losses), for logging."""
        return {f.name: v for f in dataclasses.fields(self)
                if isinstance(v := getattr(self, f.name), torch.Tensor) and v.numel() == 1}


@dataclass
class Compute:
    """``fn(carry, step) -> carry``: ordinary autograd code."""

    fn: Callable[[Carry, StepContext], Carry]
    name: str = "compute"


@dataclass
class Exchange:
    """Send the carry's ``field`` through the op ``op(carry)`` returns.

    In a step-by-step run the recording keeps every step's input and output
    carry, where plain autograd frees what no backward reads. Two flags let a
    layer that knows its data flow free such tensors as autograd would:

    ``release_sent``: once the exchange completed, drop the sent tensor's
    data (the tensor object stays, for its graph). Only for a field made by
    an op that does not save its output (``index_select``, a matmul); never
    after ``tanh`` or ``sigmoid``.
    ``release_received``: once the next compute step has run, free the
    received tensor's memory. Only when that step reads it through ops that
    do not save it (``index_select``) and keeps no other tensor sharing it.
    """

    field: str
    op: Callable[[Carry], CommOp]
    name: str = "exchange"
    release_sent: bool = False
    release_received: bool = False


@dataclass
class Program:
    """A chunk's steps; ``output`` names the carry field it hands on (the
    hidden state, or the loss on a last stage) and ``input`` the field whose
    gradient its backward returns."""

    steps: list
    output: str = "hidden"
    input: str = "hidden"


def keeping_exchanged(steps: list) -> list:
    """The same steps with every exchange keeping its tensors (no release):
    what a recording holds without the releases, for measuring them."""
    return [dataclasses.replace(s, release_sent=False, release_received=False) if isinstance(s, Exchange) else s
            for s in steps]


def run_plain(steps: list, carry: Carry, step: StepContext) -> Carry:
    with step.bound():
        for s in steps:
            if isinstance(s, Compute):
                carry = s.fn(carry, step)
            else:
                carry = carry.replace(**{s.field: communicate(getattr(carry, s.field), s.op(carry))})
    return carry


def detached(carry: Carry) -> Carry:
    """Cut the autograd graph at a step boundary: every activation becomes a
    leaf that keeps requiring grad, so the previous step gets its gradient.
    Activations must be top-level fields: one inside a tuple or another object
    would keep the graph joined across steps."""
    for f in dataclasses.fields(carry):
        value = getattr(carry, f.name)
        if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) and v.requires_grad for v in value):
            raise TypeError(f"{type(carry).__name__}.{f.name} nests a tensor that requires grad; "
                            f"give it a field of its own")
    return carry.replace(**{k: v.detach().requires_grad_(True) for k, v in carry.activations().items()})


@dataclass
class StepRecord:
    step: object
    inputs: Optional[Carry] = None
    outputs: Optional[Carry] = None
    op: Optional[CommOp] = None


@dataclass
class Recording:
    """What a step-by-step forward kept for its backward."""

    step: StepContext
    records: list = field(default_factory=list)
    final: Optional[Carry] = None


def forward_steps(steps: list, carry: Carry, rec: Recording, side: str = "F") -> Iterator[Pending]:
    """Generator running the forward step by step; yields at each started
    exchange. Returns the final carry (StopIteration.value)."""
    step = rec.step
    release_after_step: Optional[str] = None
    for s in steps:
        if isinstance(s, Compute):
            inputs = detached(carry)
            step.log(side, "compute_start", s.name)
            with torch.enable_grad(), step.bound():
                carry = s.fn(inputs, step)
            step.log(side, "compute_end", s.name)
            rec.records.append(StepRecord(s, inputs, carry))
            if release_after_step is not None:
                # The backward needs only this tensor's shape and graph edge, not its data.
                getattr(inputs, release_after_step).untyped_storage().resize_(0)
                release_after_step = None
        else:
            op, sent = s.op(carry), getattr(carry, s.field)
            step.log(side, "comm_start", s.name)
            pending = op.start(sent.detach())
            yield pending
            received = pending.wait()
            if sent.requires_grad:  # still an activation: the next step's gradient comes back through it
                received = received.detach().requires_grad_(True)
                if s.release_sent:  # only its graph is needed now: keep the tensor object, drop the data
                    sent.data = sent.new_empty(0)
                if s.release_received:
                    release_after_step = s.field
            carry = carry.replace(**{s.field: received})
            step.log(side, "comm_wait", s.name)
            rec.records.append(StepRecord(s, op=op))
    rec.final = carry
    return carry


def _accumulate(grads: dict, name: str, g: Optional[torch.Tensor]) -> None:
    if g is None:
        return
    grads[name] = g if grads.get(name) is None else grads[name] + g


def backward_steps(rec: Recording, grads: dict, side: str = "B") -> Iterator[Pending]:
    """Generator replaying the backward step by step (yields at each started
    exchange). ``grads`` maps fields of the final carry to their gradients;
    returns the gradients of the initial carry's activations, by field."""
    step, grads = rec.step, dict(grads)
    rec.final = None
    for record in reversed(rec.records):
        s = record.step
        if isinstance(s, Compute):
            outs, gouts = [], []
            inputs = record.inputs.activations()
            for name, v in record.outputs.activations().items():
                g = grads.pop(name, None)
                if g is not None:
                    outs.append(v)
                    gouts.append(g)
            step.log(side, "compute_start", s.name)
            if outs:
                # Bound for recomputations run in this thread (CPU); on CUDA the
                # autograd device thread runs them, and maybe_recompute re-binds.
                # Deferred weight gradients keep their output gradient for the W: free nothing then.
                free = step.weight_grads is None
                with step.bound():
                    _backward(outs, gouts, keep={_storage(g) for g in grads.values()}, free=free)
            step.log(side, "compute_end", s.name)
            for name, v in inputs.items():
                _accumulate(grads, name, v.grad)
            record.inputs = record.outputs = None  # free the activations
        else:
            g = grads.pop(s.field, None)
            if g is None:
                continue
            step.log(side, "comm_start", s.name)
            pending = record.op.start_transpose(g.contiguous())
            yield pending
            grads[s.field] = pending.wait()
            step.log(side, "comm_wait", s.name)
    return grads


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _free_once_consumed(out: torch.Tensor, grad: torch.Tensor, keep: set):
    """Free ``grad`` as soon as the node producing ``out`` has used it, as the
    engine frees the gradients it creates (the caller's reference would keep
    it alive for the whole backward call). Not when anything else may read it:
    a gradient kept for another field, or one the node passes on unchanged."""
    if out.grad_fn is None or _storage(grad) in keep:
        return None

    def release(grad_inputs, grad_outputs):
        mine = _storage(grad)
        if not any(isinstance(t, torch.Tensor) and _storage(t) == mine for t in grad_inputs):
            grad.untyped_storage().resize_(0)

    return out.grad_fn.register_hook(release)


def _backward(outs: list, grads: list, keep: set = frozenset(), free: bool = False) -> None:
    handles = [_free_once_consumed(o, g, keep) for o, g in zip(outs, grads)] if free else []
    try:
        if all(o.shape == g.shape for o, g in zip(outs, grads)):
            torch.autograd.backward(outs, grads)
        else:
            # An output released after its exchange has lost its shape, not its
            # graph: run the engine directly, past torch.autograd.backward's shape check.
            _engine_run_backward(tuple(outs), tuple(grads), False, False, (), allow_unreachable=True,
                                 accumulate_grad=True)
    finally:
        for h in handles:
            if h is not None:
                h.remove()


def drain(gen: Iterator[Pending]):
    """Run a step generator to its end, waiting on each exchange at once."""
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
