"""The runtime's view of one model chunk (one pipeline stage held by a rank).

A chunk describes itself; :class:`ChunkRunner` runs it for many micro-batches,
keeping each micro-batch's recording between its forward and its backward.
"""
from __future__ import annotations

from typing import Iterator, Optional, Protocol

import torch

from mtrain.pipeline.program import (EventLog, Pending, Program, Recording, State, backward_steps, drain,
                                     forward_steps)


class Chunk(Protocol):
    stage: int  # global model stage index
    is_first: bool  # takes token ids from the batch, receives nothing
    is_last: bool  # produces the loss, sends nothing

    def program(self) -> Program: ...

    def initial_state(self, batch: dict, received: Optional[torch.Tensor]) -> State:
        """The program's input: from the micro-batch (first stage) or the received hidden state."""

    def new_ctx(self, batch: dict) -> dict:
        """Per-micro-batch scratch space shared by the program's steps (dispatch plans...)."""

    def boundary_shape(self, batch_size: int, seq_len: int) -> tuple[int, ...]:
        """Shape of the hidden state this chunk receives (and sends)."""


OUTPUT_KEY = {True: "loss", False: "hidden"}


class ChunkRunner:
    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self.saved: dict[int, Recording] = {}

    def forward_gen(self, mb: int, batch: dict, received: Optional[torch.Tensor],
                    log: Optional[EventLog] = None) -> Iterator[Pending]:
        rec = Recording()
        state = self.chunk.initial_state(batch, received)
        final = yield from forward_steps(self.chunk.program(), state, self.chunk.new_ctx(batch), rec, log, "F")
        rec.ctx["_final"] = final
        self.saved[mb] = rec
        return final[OUTPUT_KEY[self.chunk.is_last]]

    def backward_gen(self, mb: int, grad_output: torch.Tensor, log: Optional[EventLog] = None) -> Iterator[Pending]:
        rec = self.saved.pop(mb)
        rec.ctx.pop("_final", None)
        grads = yield from backward_steps(rec, {OUTPUT_KEY[self.chunk.is_last]: grad_output}, log, "B")
        return None if self.chunk.is_first else grads.get("hidden")

    def forward(self, mb, batch, received=None):
        return drain(self.forward_gen(mb, batch, received))

    def backward(self, mb, grad_output):
        return drain(self.backward_gen(mb, grad_output))

    def final_state(self, mb: int) -> State:
        """The last forward state of ``mb`` (losses for logging live here)."""
        return self.saved[mb].ctx["_final"]
