"""Pipeline schedules as data.

Each schedule is a pure function ``(pp, num_microbatches, rank) -> list of
instructions`` (see ``instructions``). The same lists feed the validator, the
simulator, the renderer and the runtime.

* ``1f1b``      classic one-forward-one-backward (PipeDream-flush).
* ``zb1p``      zero-bubble ZB-H1: backward split into I (input gradient) and
                W (weight gradient); rank ``r`` defers its first ``r`` W's so
                the input-gradient wave reaches rank 0 sooner, and the W's fill
                the cool-down bubble. Same in-flight activations as 1F1B.
* ``dualpipe``  DeepSeek's DualPipe: two copies of each stage, micro-batches
                enter from both ends, eight phases per rank.
* ``dualpipev`` DeepSeek's DualPipeV ("cut in half" DualPipe): a 2*pp-stage
                model in a V, rank ``r`` holds stages ``r`` and ``2pp-1-r``.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from mtrain.pipeline.instructions import Instruction, Op, Overlap
from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES, microbatches_of_direction, placement, schedule_errors


def _check_rank(pp: int, rank: int) -> None:
    if not 0 <= rank < pp:
        raise ValueError(f"rank {rank} out of range for pp={pp}")


def one_f_one_b(pp: int, num_microbatches: int, rank: int) -> list[Instruction]:
    """Warm-up of ``pp-rank-1`` forwards, then F/B alternating, then the
    remaining backwards."""
    _check_rank(pp, rank)
    n = num_microbatches
    warmup = min(pp - rank - 1, n)
    ops: list[Instruction] = [Op("F", rank, m) for m in range(warmup)]
    nb = 0
    for m in range(warmup, n):
        ops.append(Op("F", rank, m))
        ops.append(Op("B", rank, nb))
        nb += 1
    ops.extend(Op("B", rank, m) for m in range(nb, n))
    return ops


def zb1p(pp: int, num_microbatches: int, rank: int) -> list[Instruction]:
    """ZB-H1: the 1F1B order with each B split into I then W. Rank ``r``
    holds back its first ``r`` W's (the ranks near the end of the pipeline
    would otherwise delay the input-gradient wave); after that every I is
    followed by the oldest pending W, and the rest run at the end."""
    _check_rank(pp, rank)
    n = num_microbatches
    warmup = min(pp - rank - 1, n)
    deferred = rank
    ops: list[Instruction] = [Op("F", rank, m) for m in range(warmup)]
    pending: deque[int] = deque()
    backwards = 0

    def backward() -> None:
        nonlocal backwards
        ops.append(Op("I", rank, backwards))
        pending.append(backwards)
        backwards += 1
        if backwards > deferred:
            ops.append(Op("W", rank, pending.popleft()))

    for m in range(warmup, n):
        ops.append(Op("F", rank, m))
        backward()
    while backwards < n:
        backward()
    ops.extend(Op("W", rank, m) for m in pending)
    return ops


class _TwoChunkBuilder:
    """Book-keeping shared by DualPipe and DualPipeV: per local chunk, the
    next forward / backward micro-batch, and the FIFO of deferred W's."""

    def __init__(self, chunks: tuple[tuple[int, int, int], tuple[int, int, int]]):
        # chunk -> (stage, direction, first global micro-batch)
        self.chunks = chunks
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.weights: deque[Op] = deque()
        self.ops: list[Instruction] = []

    def _op(self, kind: str, chunk: int, counter: list[int]) -> Op:
        stage, direction, base = self.chunks[chunk]
        op = Op(kind, stage, base + counter[chunk], direction)
        counter[chunk] += 1
        return op

    def fwd_op(self, chunk: int) -> Op:
        return self._op("F", chunk, self.next_f)

    def bwd_op(self, chunk: int, zero_bubble: bool = False) -> Op:
        op = self._op("I" if zero_bubble else "B", chunk, self.next_b)
        if zero_bubble:
            self.weights.append(Op("W", op.stage, op.microbatch, op.direction))
        return op

    def F(self, chunk: int) -> None:
        self.ops.append(self.fwd_op(chunk))

    def B(self, chunk: int, zero_bubble: bool = False) -> None:
        self.ops.append(self.bwd_op(chunk, zero_bubble))

    def W(self) -> None:
        self.ops.append(self.weights.popleft())

    def FB(self, f_chunk: int, b_chunk: int) -> None:
        fwd = self.fwd_op(f_chunk)
        self.ops.append(Overlap(fwd, self.bwd_op(b_chunk)))


def _eight_phases(b: _TwoChunkBuilder, half: int, pos: int, chunks_per_dir: int, middle: bool) -> list[Instruction]:
    """The eight DualPipe phases on one rank.

    ``half``: ranks per half-pipeline (DualPipe: pp/2; DualPipeV: pp);
    ``pos``: distance of the rank from the outer end (DualPipe: min(r, pp-1-r);
    DualPipeV: r); ``chunks_per_dir``: micro-batches through each chunk;
    ``middle``: the rank whose first main-phase pair is not overlapped.
    Local chunk 0 is the one fed from the rank's outer side.
    """
    # 1: forwards of chunk 0 only
    for _ in range(2 * (half - pos - 1)):
        b.F(0)
    # 2: pairs of forwards, both chunks
    for _ in range(pos + 1):
        b.F(0)
        b.F(1)
    # 3: zero-bubble backward of chunk 1 (I then its W), then a forward of chunk 1
    for _ in range(half - pos - 1):
        b.B(1, zero_bubble=True)
        b.W()
        b.F(1)
    # 4: main phase, two overlapped F&B pairs per iteration
    for i in range(chunks_per_dir - 2 * half + pos + 1):
        if i == 0 and middle:
            b.F(0)
            b.B(1)
        else:
            b.FB(0, 1)
        b.FB(1, 0)
    # 5: backward of chunk 1, then an overlapped pair
    for _ in range(half - pos - 1):
        b.B(1)
        b.FB(1, 0)
    # 6: backward pairs; the second half of them defers W
    zb = False
    steps = pos + 1
    for i in range(steps):
        if i == steps // 2 and pos % 2 == 1:
            zb = True
        b.B(1, zero_bubble=zb)
        if i == steps // 2 and pos % 2 == 0:
            zb = True
        b.B(0, zero_bubble=zb)
    # 7: a pending W, then an input-only backward of chunk 0
    for _ in range(half - pos - 1):
        b.W()
        b.B(0, zero_bubble=True)
    # 8: the remaining W's
    for _ in range(pos + 1):
        b.W()
    assert not b.weights, "every deferred W must be scheduled"
    return b.ops


def dualpipe(pp: int, num_microbatches: int, rank: int) -> list[Instruction]:
    """DualPipe. Rank ``r`` holds stage ``r`` of direction 0 (micro-batches
    ``0..N/2-1`` entering at rank 0) and stage ``pp-1-r`` of direction 1
    (micro-batches ``N/2..N-1`` entering at rank ``pp-1``). Its local chunk 0 is
    the direction entering on its side (direction 0 on the first half of the
    ranks, direction 1 on the second half)."""
    _check_rank(pp, rank)
    half_n = num_microbatches // 2
    dir0 = (rank, 0, 0)
    dir1 = (pp - 1 - rank, 1, half_n)
    second_half = rank >= pp // 2
    chunks = (dir1, dir0) if second_half else (dir0, dir1)
    pos = min(rank, pp - 1 - rank)
    middle = rank in (pp // 2 - 1, pp // 2)
    return _eight_phases(_TwoChunkBuilder(chunks), pp // 2, pos, half_n, middle)


def dualpipev(pp: int, num_microbatches: int, rank: int) -> list[Instruction]:
    """DualPipeV. A 2*pp-stage model folded in a V: rank ``r`` holds stages
    ``r`` (chunk 0, going down the ranks) and ``2pp-1-r`` (chunk 1, coming
    back); the last rank holds the two middle stages."""
    _check_rank(pp, rank)
    chunks = ((rank, 0, 0), (2 * pp - 1 - rank, 0, 0))
    return _eight_phases(_TwoChunkBuilder(chunks), pp, rank, num_microbatches, rank == pp - 1)


SCHEDULES: dict[str, Callable[[int, int, int], list[Instruction]]] = {
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}
assert tuple(SCHEDULES) == SCHEDULE_NAMES


def build_schedule(name: str, pp: int, num_microbatches: int, rank: int) -> list[Instruction]:
    """The instructions of ``rank``; ValueError naming every broken rule."""
    errors = schedule_errors(name, pp, num_microbatches)
    if errors:
        raise ValueError("; ".join(errors))
    return SCHEDULES[name](pp, num_microbatches, rank)


def build_all_ranks(name: str, pp: int, num_microbatches: int) -> list[list[Instruction]]:
    return [build_schedule(name, pp, num_microbatches, r) for r in range(pp)]


def forward_only(name: str, pp: int, num_microbatches: int, rank: int) -> list[Op]:
    """The forwards of ``rank`` when nothing is trained (evaluation): every
    micro-batch through every chunk the rank holds, chunk by chunk in stage
    order, micro-batches in order within a chunk. The micro-batches of a
    direction are those training sends that way (DualPipe: the first half in
    direction 0, the rest in direction 1), for any count ``>= 1``.

    No order of the ranks deadlocks: every rank runs its forwards in
    increasing stage order and a forward waits only for a lower stage, so the
    lowest unfinished forward can always run. Each channel carries one stage
    link's forwards in micro-batch order on both sides, as in training.
    """
    _check_rank(pp, rank)
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} must be at least 1")
    if str(name) not in SCHEDULES:
        raise ValueError("; ".join(schedule_errors(name, pp, num_microbatches)))
    keys = sorted(placement(name, pp, rank, mtp=False).chunk_keys)
    return [Op("F", stage, m, direction) for stage, direction in keys
            for m in microbatches_of_direction(name, num_microbatches, direction)]
