"""Tensors dropped once their consumer has run, rebuilt in place before its backward.

Recomputing a function under a checkpoint frees what the function keeps for
its own backward, not its outputs: an op that consumes them (the attention
core consuming q, k and v) still keeps them. :class:`Rebuilt` drops those
too, as DeepSeek-V3 does for its MLA up-projections (report §3.2.3) and
Megatron-LM's "discard output and recompute": ``fn`` runs without a graph,
the consumer runs and saves the outputs, :meth:`Rebuilt.release_after` then
frees their storage; just before the consumer's backward the outputs are
recomputed, with a graph, into that same storage (the consumer's saved
tensors see them again), and the gradients reaching the outputs flow through
that graph to ``fn``'s inputs and parameters. ``fn`` runs twice in all, as
under a checkpoint.

The recomputation binds the step context the forward ran in (deferred weight
gradients then reach its sink, as :func:`mtrain.runtime.context.maybe_recompute`
does). Only the storage of the outputs is touched: it is not a modification
autograd tracks (no version bump), and the values written are the ones
freed, computed again by the same ops.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from mtrain.runtime.context import current_step


class _Recompute(torch.autograd.Function):
    """``rebuilt.fn(*inputs)`` without a graph; the backward runs the graph of
    the rebuilt outputs."""

    @staticmethod
    def forward(ctx, rebuilt: "Rebuilt", *inputs):
        ctx.rebuilt = rebuilt
        # Kept by the Rebuilt for the refill as well; saved here too so that what
        # the backward keeps is visible to saved-tensor hooks (memory accounting).
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return tuple(rebuilt.fn(*inputs))

    @staticmethod
    def backward(ctx, *grads):
        inputs, outputs = ctx.rebuilt.take_graph()
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *[x.grad if x.requires_grad else None for x in inputs])


class Rebuilt:
    """``fn``'s outputs that :meth:`release_after` drops and the backward
    rebuilds (module doc); ``fn`` must compute the same values each time.

    It holds ``fn``'s inputs and the outputs' storage, never the output
    tensors: their ``grad_fn`` holds it, and a reference back would be a
    cycle through autograd's graph that Python's collector cannot free."""

    def __init__(self, fn: Callable):
        self.fn, self.step = fn, current_step()
        self.inputs: tuple = ()
        self._storages: list = []
        self._graph = None

    def __call__(self, *inputs: torch.Tensor) -> tuple:
        """``fn(*inputs)``, its outputs recomputed for the backward."""
        self.inputs = inputs
        return _Recompute.apply(self, *inputs)

    def release_after(self, consumed: torch.Tensor, outputs: tuple) -> None:
        """Free the storage of ``outputs`` (what :meth:`__call__` returned) now;
        refill it when the backward reaches ``consumed`` (an output of the op
        that saved them), before that op's own backward runs. Nothing to do
        when ``consumed`` has no backward (nothing requires a gradient)."""
        if consumed.grad_fn is None:
            return
        seen = set()
        for t in outputs:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                self._storages.append((storage, storage.nbytes()))
        for storage, _ in self._storages:
            storage.resize_(0)
        consumed.grad_fn.register_prehook(lambda grad_outputs: self._refill())

    def _refill(self) -> None:
        if self._graph is not None:
            return
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in self.inputs]
        bound = self.step.bound() if self.step is not None else contextlib.nullcontext()
        with torch.enable_grad(), bound:
            outputs = tuple(self.fn(*inputs))
        fresh = {}
        for t in outputs:
            fresh.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
        for (storage, nbytes), new in zip(self._storages, fresh.values()):
            if storage.nbytes() == 0:  # a second backward (retain_graph) finds it filled
                storage.resize_(nbytes)
                storage.copy_(new)
        self._graph = (inputs, outputs)

    def take_graph(self):
        """The rebuilt (inputs, outputs) with their graph, once per backward
        (rebuilt now if the consumer's backward did not run first). The
        consumer's backward is done by now: the refilled storage is left to
        its saved tensors, which autograd frees."""
        self._refill()
        graph, self._graph = self._graph, None
        self._storages = []
        return graph
