"""One model chunk run for many micro-batches, as the pipeline needs it.

A chunk describes itself (:class:`Chunk`); :class:`ChunkRunner` keeps each
micro-batch's recording and step context between its forward and its backward.
"""
from __future__ import annotations

from typing import Iterator, Optional, Protocol

import torch

from mtrain.runtime.comm import Pending
from mtrain.runtime.context import StepContext
from mtrain.runtime.program import Carry, Program, Recording, backward_steps, drain, forward_steps


class Chunk(Protocol):
    stage: int  # global model stage index
    is_first: bool  # takes token ids from the batch, receives nothing
    is_last: bool  # produces the loss, sends nothing

    def program(self) -> Program: ...

    def initial_carry(self, batch: dict, received: Optional[torch.Tensor]) -> Carry:
        """The program's input: from the micro-batch (first stage) or the received hidden state."""

    def boundary_shape(self, batch_size: int, seq_len: int) -> tuple[int, ...]:
        """Shape of the hidden state this chunk receives (and sends)."""


class ChunkRunner:
    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self.program = chunk.program()
        self.saved: dict[int, Recording] = {}

    def forward_gen(self, mb: int, batch: dict, received: Optional[torch.Tensor],
                    step: Optional[StepContext] = None) -> Iterator[Pending]:
        rec = Recording(step or StepContext())
        if received is not None and not self.chunk.is_first:
            # The received hidden state is an activation: its gradient goes back to the previous stage.
            received = received.detach().requires_grad_(True)
        final = yield from forward_steps(self.program.steps, self.chunk.initial_carry(batch, received), rec, "F")
        self.saved[mb] = rec
        return getattr(final, self.program.output)

    def backward_gen(self, mb: int, grad_output: torch.Tensor) -> Iterator[Pending]:
        rec = self.saved.pop(mb)
        grads = yield from backward_steps(rec, {self.program.output: grad_output}, "B")
        left = set(grads) - {self.program.input}
        if left:  # a gradient that reached no step: the program dropped an activation
            raise RuntimeError(f"stage {self.chunk.stage}: gradients of {sorted(left)} reached no step")
        return None if self.chunk.is_first else grads.get(self.program.input)

    def forward(self, mb, batch, received=None, step: Optional[StepContext] = None):
        return drain(self.forward_gen(mb, batch, received, step))

    def backward(self, mb, grad_output):
        return drain(self.backward_gen(mb, grad_output))

    def context(self, mb: int) -> StepContext:
        """The step context of ``mb``'s forward, until its backward has run."""
        return self.saved[mb].step

    def final_carry(self, mb: int) -> Carry:
        """The last forward carry of ``mb`` (losses for logging live here)."""
        return self.saved[mb].final
