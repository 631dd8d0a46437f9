"""Small stand-in chunks for testing and benchmarking the pipeline runtime.

* :class:`ToyChunk` -- a real, differentiable stage shaped like an MoE layer:
  ``tanh(linear)`` | exchange ("dispatch") | ``tanh(linear)`` ("experts") |
  exchange ("combine") | ``linear`` + residual; the first stage embeds token
  ids, the last one ends in a cross-entropy loss. Its exchanges are any
  :class:`~mtrain.runtime.comm.CommOp` (an ``AllToAllOp`` over a 2-rank
  group, or ``IdentityOp``). Weights depend only on the stage index and seed.
* :class:`SleepChunk` -- a synthetic stage whose forward, input-gradient and
  weight-gradient parts sleep for given times and whose exchanges are timers,
  so the runtime's scheduling can be measured apart from the machine's speed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtrain.runtime.comm import CommOp, IdentityOp, Pending
from mtrain.runtime.context import current_step
from mtrain.runtime.program import Carry, Compute, Exchange, Program
from mtrain.runtime.wgrad import accumulate_grad, defer_weight_grad, linear


@dataclass
class ToyCarry(Carry):
    input_ids: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    dispatch: Optional[CommOp] = None  # this micro-batch's two exchanges
    combine: Optional[CommOp] = None


class ToyChunk(nn.Module):
    def __init__(self, stage: int, num_stages: int, hidden: int = 8, vocab: int = 11, seed: int = 0,
                 comm_op: Callable[[], CommOp] = IdentityOp):
        super().__init__()
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.hidden, self.comm_op = hidden, comm_op
        g = torch.Generator().manual_seed(seed * 1000 + stage)

        def param(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g) / shape[-1] ** 0.5)

        if self.is_first:
            self.embed = param(vocab, hidden)
        self.w_in, self.b_in = param(hidden, hidden), param(hidden)
        self.w_expert = param(hidden, hidden)
        self.w_out = param(hidden, hidden)
        if self.is_last:
            self.head = param(vocab, hidden)

    def _attention(self, c: ToyCarry, step) -> ToyCarry:
        h = F.embedding(c.input_ids, self.embed) if self.is_first else c.hidden
        return c.replace(hidden=torch.tanh(linear(h, self.w_in, self.b_in)), residual=h)

    def _experts(self, c: ToyCarry, step) -> ToyCarry:
        return c.replace(hidden=torch.tanh(linear(c.hidden, self.w_expert)))

    def _output(self, c: ToyCarry, step) -> ToyCarry:
        h = c.residual + linear(c.hidden, self.w_out)
        if not self.is_last:
            return c.replace(hidden=h, residual=None)
        logits = linear(h, self.head)
        loss = F.cross_entropy(logits.flatten(0, -2), c.labels.flatten())
        return ToyCarry(loss=loss, lm_loss=loss.detach())

    def program(self) -> Program:
        steps = [Compute(self._attention, "attention"), Exchange("hidden", lambda c: c.dispatch, "dispatch"),
                 Compute(self._experts, "experts"), Exchange("hidden", lambda c: c.combine, "combine"),
                 Compute(self._output, "output")]
        return Program(steps, output="loss" if self.is_last else "hidden")

    def initial_carry(self, batch: dict, received: Optional[torch.Tensor]) -> ToyCarry:
        return ToyCarry(input_ids=batch["input_ids"], labels=batch["labels"], hidden=received,
                        dispatch=self.comm_op(), combine=self.comm_op())

    def boundary_shape(self, batch_size: int, seq_len: int) -> tuple[int, ...]:
        return (batch_size, seq_len, self.hidden)


# ---------------------------------------------------------------------------
# Synthetic stages
# ---------------------------------------------------------------------------

def sleep_ms(ms: float, busy: bool = False) -> None:
    """Sleep (or spin, keeping a core busy) for ``ms`` milliseconds."""
    if ms <= 0:
        return
    end = time.perf_counter() + ms / 1000.0
    if not busy:
        time.sleep(ms / 1000.0)
        return
    while time.perf_counter() < end:
        pass


class _Timer:
    """A 'work' that is done ``ms`` after it started (an exchange on the wire)."""

    def __init__(self, ms: float):
        self.deadline = time.perf_counter() + ms / 1000.0

    def wait(self) -> None:
        left = self.deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)


class TimerOp(CommOp):
    """An exchange that returns its input after ``forward_ms`` (``backward_ms``
    for the transpose) of wall time, during which the caller may compute."""

    def __init__(self, forward_ms: float, backward_ms: float):
        self.forward_ms, self.backward_ms = forward_ms, backward_ms

    def start(self, x):
        return Pending(x, _Timer(self.forward_ms))

    def start_transpose(self, grad):
        return Pending(grad, _Timer(self.backward_ms))


class _SleepCompute(torch.autograd.Function):
    """Identity on ``x`` that sleeps ``fwd_ms`` in forward and ``input_ms`` in
    backward, and spends ``weight_ms`` on the gradient of ``weight`` -- queued
    when weight gradients are deferred."""

    @staticmethod
    def forward(ctx, x, weight, fwd_ms, input_ms, weight_ms, busy):
        ctx.weight, ctx.input_ms, ctx.weight_ms, ctx.busy = weight, input_ms, weight_ms, busy
        ctx.step = current_step()
        sleep_ms(fwd_ms, busy)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        sleep_ms(ctx.input_ms, ctx.busy)
        weight, weight_ms, busy = ctx.weight, ctx.weight_ms, ctx.busy

        def weight_grad():
            sleep_ms(weight_ms, busy)
            return torch.zeros_like(weight)

        if not defer_weight_grad(ctx.step, weight, weight_grad):
            accumulate_grad(weight, weight_grad())
        return grad, None, None, None, None, None


class SleepChunk(nn.Module):
    """A stage costing ``F`` ms forward, ``B`` ms full backward of which ``W`` ms
    weight gradient, with exchanges of ``fwd_comm_ms`` / ``bwd_comm_ms`` (timers)
    between two equal compute halves. Alone, F = compute + exchange; inside an
    overlapped pair each side's exchange runs during the other's compute."""

    def __init__(self, stage: int, num_stages: int, F_ms: float, B_ms: float, W_ms: float,
                 fwd_comm_ms: float = 0.0, bwd_comm_ms: float = 0.0, hidden: int = 16, busy: bool = False):
        super().__init__()
        if not (0 <= fwd_comm_ms <= F_ms and 0 <= W_ms and bwd_comm_ms + W_ms <= B_ms):
            raise ValueError(f"need 0 <= exchange <= F and exchange + W <= B; got F={F_ms}, B={B_ms}, W={W_ms}, "
                             f"exchanges {fwd_comm_ms}/{bwd_comm_ms}")
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.hidden, self.busy = hidden, busy
        self.fwd_half = (F_ms - fwd_comm_ms) / 2
        self.input_half = (B_ms - W_ms - bwd_comm_ms) / 2
        self.weight_half = W_ms / 2
        self.fwd_comm_ms, self.bwd_comm_ms = fwd_comm_ms, bwd_comm_ms
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(hidden)) for _ in range(2)])

    def _half(self, i: int) -> Callable:
        def fn(c: ToyCarry, step) -> ToyCarry:
            h = _SleepCompute.apply(c.hidden, self.weights[i], self.fwd_half, self.input_half,
                                    self.weight_half, self.busy)
            if self.is_last and i == 1:
                return ToyCarry(loss=h.mean())
            return c.replace(hidden=h)
        return fn

    def program(self) -> Program:
        steps = [Compute(self._half(0), "compute 0")]
        if self.fwd_comm_ms or self.bwd_comm_ms:
            steps.append(Exchange("hidden", lambda c: c.dispatch, "exchange"))
        steps.append(Compute(self._half(1), "compute 1"))
        return Program(steps, output="loss" if self.is_last else "hidden")

    def initial_carry(self, batch: dict, received: Optional[torch.Tensor]) -> ToyCarry:
        if self.is_first:
            ids = batch["input_ids"]
            received = torch.zeros(*ids.shape, self.hidden)
        return ToyCarry(hidden=received, dispatch=TimerOp(self.fwd_comm_ms, self.bwd_comm_ms))

    def boundary_shape(self, batch_size: int, seq_len: int) -> tuple[int, ...]:
        return (batch_size, seq_len, self.hidden)
