"""Run one rank's pipeline schedule on real model chunks.

The executor holds no schedule logic: it walks the instruction list that
``build_schedule(schedule, pp, num_microbatches, pp_rank)`` gives and, for
each instruction, takes the inputs the data dependencies name (the previous
stage's output for ``F``, the next stage's input gradient for ``B``/``I``),
runs it on the chunk of its stage and sends the result on.

Communication: the receives of instruction ``i+1`` are posted before
instruction ``i`` runs, so the transfer overlaps its compute; sends are posted
right after the compute and never waited on until the end of the step
(their tensors are dropped as soon as they completed). Each message travels on
the process group of its channel (sender, receiver, F/B), within which both
sides post in the same order, so NCCL (which ignores tags) matches them -- see
:mod:`mtrain.pipeline.channels` and :mod:`mtrain.pipeline.p2p`.

Step context: every micro-batch's forward gets its own
:class:`~mtrain.runtime.context.StepContext`, kept until its backward. Loss:
the last stage's program hands on the loss (mean over the micro-batch's
tokens); its backward is seeded with ``1/num_microbatches`` so the gradients
are those of the mean loss over the step, and the context's loss scale (which
scales the auxiliary losses) is the same factor.

``I`` runs the backward while its micro-batch's context defers weight
gradients, and keeps the queued work until its ``W``. An ``Overlap`` runs the
forward and the backward generators interleaved (``overlap=True``) or one
after the other; the math is the same, so results are bit-identical.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from mtrain.pipeline.channels import Channel, create_p2p_channels, gather_pipelines
from mtrain.pipeline.instructions import (BACKWARD_INPUT, FORWARD, Instruction, Op, Overlap,
                                          backward_dest_rank, backward_source_rank, forward_dest_rank,
                                          forward_source_rank)
from mtrain.pipeline.p2p import PipeComm, RecvRequest
from mtrain.pipeline.schedule_rules import num_model_stages, placement
from mtrain.pipeline.schedules import build_schedule, forward_only
from mtrain.pipeline.trace import OpRecord, RankTrace
from mtrain.runtime.context import EventLog, StepContext, WeightGradSink, weights_fixed
from mtrain.runtime.program import Carry, Program, drain, run_overlapped, run_plain
from mtrain.runtime.runner import Chunk, ChunkRunner

ChunkKey = tuple  # (stage, direction)


@dataclass
class StepResult:
    """What one rank measured in one step. ``losses`` / ``metrics`` are filled on
    the rank(s) holding a last stage (DualPipe: rank ``pp-1`` for direction 0,
    rank 0 for direction 1)."""

    losses: dict[int, float] = field(default_factory=dict)  # micro-batch -> loss
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # micro-batch -> scalar outputs
    # Auxiliary-loss values of every MoE layer copy on this rank, summed on the device.
    aux_loss_sum: Optional[torch.Tensor] = None
    aux_loss_count: int = 0
    busy: float = 0.0  # seconds spent in instructions (inputs there to results sent)
    wall: float = 0.0  # seconds from step start to the last send completed
    trace: Optional[RankTrace] = None

    @property
    def idle(self) -> float:
        return self.wall - self.busy


@dataclass
class ForwardResult:
    """One forward-only pass (:meth:`PipelineExecutor.forward_only`): the final
    carry of every micro-batch whose last stage this rank runs (on the device;
    the losses of a training program), and the pass's wall time."""

    outputs: dict[int, Carry] = field(default_factory=dict)
    wall: float = 0.0


def expected_chunk_keys(schedule: str, pp: int, pp_rank: int) -> list[ChunkKey]:
    """The (stage, direction) chunks pipeline rank ``pp_rank`` must hold."""
    return list(placement(schedule, pp, pp_rank, mtp=False).chunk_keys)  # the same with or without MTP


def _chunk_dtype_device(chunk: Chunk) -> tuple[torch.dtype, torch.device]:
    params = getattr(chunk, "parameters", None)
    for p in (params() if callable(params) else ()):
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


class PipelineExecutor:
    """Runs ``build_schedule(schedule, pp, num_microbatches, pp_rank)`` on ``chunks``.

    ``chunks`` maps ``(stage, direction)`` to the chunks this rank holds (see
    :func:`expected_chunk_keys`). ``pp_group_ranks[i]`` is the global rank of
    pipeline rank ``i``. ``dtype`` / ``device`` of the received hidden states
    default to those of each chunk's first floating parameter.

    ``channels`` maps each channel this rank uses to its process group
    (:func:`~mtrain.pipeline.channels.create_p2p_channels`, called by every rank
    for all pipelines). Without it, and with ``pp > 1``, the constructor creates
    them itself: it gathers every rank's ``pp_group_ranks`` and is then
    collective over the world (every rank must construct its executor, in the
    same order relative to other group creations). ``p2p_tags=False`` sends every
    message with tag 0 (matched by channel and order alone, as NCCL does).
    """

    def __init__(self, schedule: str, pp: int, pp_rank: int, num_microbatches: int,
                 chunks: Mapping[ChunkKey, Chunk], pp_group_ranks: Sequence[int], overlap: bool = True,
                 trace: bool = False, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None,
                 channels: Optional[Mapping[Channel, dist.ProcessGroup]] = None, p2p_tags: bool = True):
        if len(pp_group_ranks) != pp:
            raise ValueError(f"pp_group_ranks has {len(pp_group_ranks)} ranks, expected pp={pp}")
        expected = expected_chunk_keys(schedule, pp, pp_rank)
        if sorted(chunks) != sorted(expected):
            raise ValueError(f"{schedule} pipeline rank {pp_rank} holds chunks {expected} (stage, direction); "
                             f"got {sorted(chunks)}")
        self.schedule, self.pp, self.pp_rank = schedule, pp, pp_rank
        self.num_microbatches = num_microbatches
        self.instructions: list[Instruction] = build_schedule(schedule, pp, num_microbatches, pp_rank)
        self.chunks = dict(chunks)
        self.runners = {key: ChunkRunner(chunk) for key, chunk in self.chunks.items()}
        self.overlap, self.trace = overlap, trace
        self._dtype_device = {}
        for key, chunk in self.chunks.items():
            own_dtype, own_device = _chunk_dtype_device(chunk)
            self._dtype_device[key] = (dtype or own_dtype, device or own_device)
        if channels is None:
            channels = {} if pp == 1 else create_p2p_channels(gather_pipelines(pp_group_ranks), schedule, pp)
        self.comm = PipeComm(pp_rank, pp_group_ranks, num_model_stages(schedule, pp), num_microbatches, channels,
                             tagged=p2p_tags)

    # -- dependencies ------------------------------------------------------
    def _source(self, op: Op) -> Optional[tuple[tuple, int]]:
        """(message key, pipeline rank) of the input ``op`` receives, or None."""
        if op.kind == FORWARD:
            src = forward_source_rank(self.schedule, self.pp, op.stage, op.direction)
            return None if src is None else (("F", op.stage - 1, op.microbatch, op.direction), src)
        if op.kind == "W":
            return None
        src = backward_source_rank(self.schedule, self.pp, op.stage, op.direction)
        return None if src is None else (("B", op.stage + 1, op.microbatch, op.direction), src)

    def _recv_requests(self, ins: Instruction, batches: Sequence[dict]) -> list[RecvRequest]:
        out = []
        for op in ins.ops:
            source = self._source(op)
            if source is None:
                continue
            key, src = source
            chunk_key = (op.stage, op.direction)
            ids = batches[op.microbatch]["input_ids"]
            shape = tuple(self.chunks[chunk_key].boundary_shape(ids.shape[0], ids.shape[1]))
            dtype, device = self._dtype_device[chunk_key]
            out.append(RecvRequest(key, src, shape, dtype, device))
        return out

    def _input(self, op: Op) -> Optional[torch.Tensor]:
        source = self._source(op)
        if source is None:
            return None
        x = self.comm.take(*source)
        return x.requires_grad_(True) if op.kind == FORWARD else x

    # -- one step ----------------------------------------------------------
    def step(self, microbatches: Sequence[dict]) -> StepResult:
        """Run this rank's instructions on ``microbatches`` (indexed by global
        micro-batch; every rank passes the same list)."""
        if len(microbatches) != self.num_microbatches:
            raise ValueError(f"got {len(microbatches)} micro-batches, the schedule has {self.num_microbatches}")
        self._batches = microbatches
        self._result = StepResult()
        self._contexts: list[StepContext] = []
        self._pending_w: dict[tuple, WeightGradSink] = {}
        self._loss_seed: dict[tuple, torch.Tensor] = {}
        self._scalars: dict[int, dict[str, torch.Tensor]] = {}  # last stage: micro-batch -> losses, on the device
        ops = self.instructions
        t_start = time.perf_counter()
        records: list[OpRecord] = []
        self.comm.post_recvs(self._recv_requests(ops[0], microbatches) if ops else [])
        with weights_fixed():  # every micro-batch shares one FP8 copy of each weight
            for i, ins in enumerate(ops):
                if i + 1 < len(ops):
                    self.comm.post_recvs(self._recv_requests(ops[i + 1], microbatches))
                records.append(self._run(ins))
                self.comm.poll_sends()
        self.comm.finish()
        if self._pending_w:
            raise RuntimeError(f"input-only backwards without their W: {sorted(self._pending_w)}")
        t_end = time.perf_counter()
        result = self._result
        self._read_scalars(result)
        aux = [value for step in self._contexts for value in step.aux_losses]
        if aux:  # summed on the device: read once per step, by the caller
            result.aux_loss_sum, result.aux_loss_count = torch.stack(aux).sum(), len(aux)
        result.busy = sum(r.duration for r in records)
        result.wall = t_end - t_start
        if self.trace:
            rank = dist.get_rank() if dist.is_initialized() else self.pp_rank
            result.trace = RankTrace(self.pp_rank, rank, t_start, t_end, records)
        return result

    def _run(self, ins: Instruction) -> OpRecord:
        wait_start = time.perf_counter()
        log = EventLog() if self.trace else None
        if isinstance(ins, Overlap):
            f, b = ins.forward, ins.backward
            received, grad = self._input(f), self._backward_seed(b)
            start = time.perf_counter()
            rf, rb = self.runners[(f.stage, f.direction)], self.runners[(b.stage, b.direction)]
            batch = self._batches[f.microbatch]
            forward = rf.forward_gen(f.microbatch, batch, received, self._context(log))
            rb.context(b.microbatch).events = log
            with self._weight_grads(b):
                if self.overlap:
                    out, grad_in = run_overlapped(forward, rb.backward_gen(b.microbatch, grad))
                else:
                    out = drain(forward)
                    grad_in = drain(rb.backward_gen(b.microbatch, grad))
            self.comm.send(self._after_forward(f, out) + self._after_backward(b, grad_in))
        elif ins.kind == FORWARD:
            received = self._input(ins)
            start = time.perf_counter()
            runner = self.runners[(ins.stage, ins.direction)]
            out = drain(runner.forward_gen(ins.microbatch, self._batches[ins.microbatch], received,
                                           self._context(log)))
            self.comm.send(self._after_forward(ins, out))
        elif ins.kind == "W":
            start = time.perf_counter()
            self._pending_w.pop((ins.stage, ins.microbatch, ins.direction)).run()
        else:
            grad = self._backward_seed(ins)
            start = time.perf_counter()
            runner = self.runners[(ins.stage, ins.direction)]
            runner.context(ins.microbatch).events = log
            with self._weight_grads(ins):
                grad_in = drain(runner.backward_gen(ins.microbatch, grad))
            self.comm.send(self._after_backward(ins, grad_in))
        end = time.perf_counter()
        return OpRecord(ins, wait_start, start, end, log.events if log else [])

    def _context(self, log: Optional[EventLog]) -> StepContext:
        """A new micro-batch's step context; its auxiliary losses are collected."""
        step = StepContext(loss_scale=1.0 / self.num_microbatches, events=log)
        self._contexts.append(step)
        return step

    def _backward_seed(self, op: Op) -> torch.Tensor:
        """The output gradient of a B/I: received, or 1/N for the loss."""
        key = (op.stage, op.microbatch, op.direction)
        if key in self._loss_seed:
            return self._loss_seed.pop(key)
        return self._input(op)

    @contextlib.contextmanager
    def _weight_grads(self, op: Op):
        """For an ``I``, queue the weight gradients until its ``W``."""
        if op.kind != BACKWARD_INPUT:
            yield
            return
        step = self.runners[(op.stage, op.direction)].context(op.microbatch)
        with step.deferring_weight_grads() as sink:
            yield
        self._pending_w[(op.stage, op.microbatch, op.direction)] = sink

    def _after_forward(self, op: Op, out: torch.Tensor) -> list:
        runner = self.runners[(op.stage, op.direction)]
        dst = forward_dest_rank(self.schedule, self.pp, op.stage, op.direction)
        if dst is not None:
            return [(("F", op.stage, op.microbatch, op.direction), out, dst)]
        # Last stage: ``out`` is the loss; keep the logged scalars (read at the
        # end of the step, not per micro-batch) and the seed.
        scalars = {name: value.detach() for name, value in runner.final_carry(op.microbatch).scalars().items()}
        self._scalars[op.microbatch] = {**scalars, "loss": out.detach()}
        self._loss_seed[(op.stage, op.microbatch, op.direction)] = torch.full_like(
            out.detach(), 1.0 / self.num_microbatches)
        return []

    def _read_scalars(self, result: StepResult) -> None:
        """Every last-stage loss of the step, read back to the host in one copy."""
        keys = [(mb, name) for mb, values in sorted(self._scalars.items()) for name in values]
        if not keys:
            return
        values = torch.stack([self._scalars[mb][name].float().reshape(()) for mb, name in keys]).tolist()
        for (mb, name), value in zip(keys, values):
            result.metrics.setdefault(mb, {})[name] = value
            if name == "loss":
                result.losses[mb] = value

    def _after_backward(self, op: Op, grad_in: Optional[torch.Tensor]) -> list:
        dst = backward_dest_rank(self.schedule, self.pp, op.stage, op.direction)
        if dst is None:
            return []
        if grad_in is None:
            raise RuntimeError(f"{op}: the chunk returned no input gradient to send to pipeline rank {dst}")
        return [(("B", op.stage, op.microbatch, op.direction), grad_in, dst)]

    # -- forward only (evaluation) -------------------------------------------------
    def forward_only(self, microbatches: Sequence[dict],
                     program: Optional[Callable[[Chunk], Program]] = None) -> ForwardResult:
        """Every micro-batch's forward through all stages and nothing else
        (held-out evaluation): the order of
        :func:`~mtrain.pipeline.schedules.forward_only`, the same p2p channels as
        training, each chunk's program run plainly under ``torch.no_grad`` (no
        recording, no step context kept, no gradient touched). ``program(chunk)``
        gives the steps a chunk runs (default: its training program); any count
        of micro-batches from 1 to the schedule's. Every rank of the pipeline
        (and its expert-parallel peers) must call it with the same count."""
        n = len(microbatches)
        if not 1 <= n <= self.num_microbatches:
            raise ValueError(f"got {n} micro-batches; a forward-only pass takes 1 to {self.num_microbatches}")
        programs = {key: program(chunk) if program is not None else self.runners[key].program
                    for key, chunk in self.chunks.items()}
        ops = forward_only(self.schedule, self.pp, n, self.pp_rank)
        result, start = ForwardResult(), time.perf_counter()
        with torch.no_grad(), weights_fixed():
            self.comm.post_recvs(self._recv_requests(ops[0], microbatches) if ops else [])
            for i, op in enumerate(ops):
                if i + 1 < len(ops):
                    self.comm.post_recvs(self._recv_requests(ops[i + 1], microbatches))
                key = (op.stage, op.direction)
                source = self._source(op)
                received = None if source is None else self.comm.take(*source)
                carry = self.chunks[key].initial_carry(microbatches[op.microbatch], received)
                final = run_plain(programs[key].steps, carry, StepContext(loss_scale=1.0 / n))
                dst = forward_dest_rank(self.schedule, self.pp, op.stage, op.direction)
                if dst is None:
                    result.outputs[op.microbatch] = final
                else:
                    out = getattr(final, programs[key].output)
                    self.comm.send([(("F", op.stage, op.microbatch, op.direction), out, dst)])
                self.comm.poll_sends()
            self.comm.finish()
        result.wall = time.perf_counter() - start
        return result
