"""Point-to-point transfers between pipeline ranks, one process group per channel.

Every message is named by a :data:`MessageKey` ``(kind, stage, microbatch,
direction)``: ``("F", s, m, d)`` is the forward output of stage ``s`` and
``("B", s, m, d)`` the gradient of stage ``s``'s input. It travels on the
process group of its :class:`~mtrain.pipeline.channels.Channel` (sender,
receiver, kind); within a channel sender and receiver post in the same order
(see :mod:`mtrain.pipeline.channels`), which is all NCCL matches by. Ops of one
``batch_isend_irecv`` must share a group, so each channel's ops form a batch.
The key is also the message's tag (gloo honours tags, NCCL ignores them);
``tagged=False`` sends everything with tag 0 so tests prove the channels alone
match the messages.

A message whose sender and receiver are the same rank (DualPipeV's turn from
stage ``pp-1`` to ``pp``) is handed over locally.

Sends never block: :meth:`PipeComm.send` posts them and keeps the tensors until
the transfer completed, so their memory is not reused while the communication
stream still reads it. A received tensor is returned by :meth:`PipeComm.take`
only after ``wait()``, called on the main thread: with NCCL that makes the
current (compute) stream wait for the transfer.

With gloo two helper threads keep the main thread computing: posting a gloo
receive costs 0.1-0.5 ms of blocking work (measured on the 2-core CPU
machines), so receives are posted by one thread; a gloo send reports
completion only once waited on, so another thread waits for each send and
then drops its tensors. Both waits release the interpreter lock. Other
backends (NCCL, CUDA tensors) post and wait inline and poll sends with
``is_completed``.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from mtrain.parallel.groups import p2p_timeout
from mtrain.pipeline.channels import Channel, MessageKey

_KINDS = {"F": 0, "B": 1}


def message_tag(key: MessageKey, num_stages: int, num_microbatches: int) -> int:
    """A distinct non-negative tag for every message of one step."""
    kind, stage, mb, direction = key
    if not (0 <= stage < num_stages and 0 <= mb < num_microbatches and direction in (0, 1)):
        raise ValueError(f"message {key} out of range ({num_stages} stages, {num_microbatches} micro-batches)")
    return ((_KINDS[kind] * 2 + direction) * num_stages + stage) * num_microbatches + mb


@dataclass
class RecvRequest:
    key: MessageKey
    src: int  # pipeline rank of the sender
    shape: tuple
    dtype: torch.dtype
    device: torch.device


class _Works:
    """Works that complete together; waited on once (waiting twice on a gloo
    receive would wait for a second message)."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> None:
        works, self.works = self.works, []
        # On gloo a receive's wait blocks the host anyway: give it the collectives'
        # timeout now (it would keep its group's first one). On NCCL a timeout
        # would turn the stream wait into a host sync, so none.
        timeout = p2p_timeout() if works and dist.get_backend() == "gloo" else None
        for w in works:
            w.wait(timeout) if timeout is not None else w.wait()

    def completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


def _post(ops: list) -> list[_Works]:
    """Post ``ops``; one waitable per op (with coalescing backends, which
    return fewer works than ops, every op waits for the whole batch)."""
    works = dist.batch_isend_irecv(ops)
    if len(works) == len(ops):
        return [_Works([w]) for w in works]
    return [_Works(works)] * len(ops)


class _PendingRecv:
    """A receive whose posting may still be under way on the helper thread."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.works: Optional[_Works] = None
        self.error: Optional[BaseException] = None
        self.posted = threading.Event()

    def wait(self) -> torch.Tensor:
        self.posted.wait()
        if self.error is not None:
            raise RuntimeError(f"posting a pipeline receive failed: {self.error}") from self.error
        self.works.wait()
        return self.buffer


class _Helper:
    """A daemon thread running queued jobs in order; ``join`` waits for all and
    re-raises the first failure."""

    def __init__(self, name: str):
        self._queue: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self._error: Optional[BaseException] = None
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except BaseException as e:  # reported by join()
                self._error = self._error or e
            del job  # drop the tensors it held before waiting for the next
            self._queue.task_done()

    def join(self) -> None:
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"pipeline communication failed: {error}") from error


def _by_channel(items: list[tuple[Channel, object]]) -> dict[Channel, list]:
    """Group ``(channel, item)`` pairs by channel, keeping their order."""
    out: dict[Channel, list] = {}
    for channel, item in items:
        out.setdefault(channel, []).append(item)
    return out


class PipeComm:
    """Sends and receives among the ranks of one pipeline.

    ``pp_group_ranks[i]`` is the global rank of pipeline rank ``i``;
    ``channels`` maps every channel this rank sends or receives on to its
    process group (:func:`~mtrain.pipeline.channels.create_p2p_channels`).
    ``tagged=False``: every message has tag 0, so messages are matched by
    channel and posting order alone, as NCCL does.
    """

    def __init__(self, pp_rank: int, pp_group_ranks: Sequence[int], num_stages: int, num_microbatches: int,
                 channels: Mapping[Channel, dist.ProcessGroup], tagged: bool = True):
        self.pp_rank = pp_rank
        self.ranks = list(pp_group_ranks)
        self.num_stages, self.num_microbatches = num_stages, num_microbatches
        self.channels = dict(channels)
        self.tagged = tagged
        self._recvs: dict[MessageKey, _PendingRecv] = {}
        self._local: dict[MessageKey, torch.Tensor] = {}
        self._sends: list[tuple[_Works, list]] = []  # polled (non-gloo)
        threaded = any(dist.get_backend(group) == "gloo" for group in self.channels.values())
        self._poster = _Helper("pipeline-recv-post") if threaded else None
        self._releaser = _Helper("pipeline-send-release") if threaded else None

    def _op(self, op: Callable, tensor: torch.Tensor, key: MessageKey, channel: Channel, peer: int) -> dist.P2POp:
        group = self.channels.get(channel)
        if group is None:
            raise RuntimeError(f"pipeline rank {self.pp_rank} has no process group for {channel} (message {key}); "
                               f"it has {sorted(self.channels)}")
        tag = message_tag(key, self.num_stages, self.num_microbatches) if self.tagged else 0
        return dist.P2POp(op, tensor, self.ranks[peer], group, tag)

    def post_recvs(self, requests: Sequence[RecvRequest]) -> None:
        """Post the receives not posted yet (local hand-offs need none), one
        batch per channel."""
        ops, pending = [], []
        for req in requests:
            if req.src == self.pp_rank or req.key in self._recvs:
                continue
            recv = _PendingRecv(torch.empty(req.shape, dtype=req.dtype, device=req.device))
            channel = Channel(req.src, self.pp_rank, req.key[0])
            ops.append((channel, self._op(dist.irecv, recv.buffer, req.key, channel, req.src)))
            pending.append((channel, recv))
            self._recvs[req.key] = recv
        if not ops:
            return
        batches = list(zip(_by_channel(ops).values(), _by_channel(pending).values()))

        def post() -> None:
            try:
                for batch_ops, batch_recvs in batches:
                    for recv, works in zip(batch_recvs, _post(batch_ops)):
                        recv.works = works
            except BaseException as e:
                for _, recv in pending:
                    recv.error = e
                raise
            finally:
                for _, recv in pending:
                    recv.posted.set()

        if self._poster is not None:
            self._poster.submit(post)
        else:
            post()

    def take(self, key: MessageKey, src: int) -> torch.Tensor:
        """The message ``key`` from pipeline rank ``src`` (waits for it)."""
        if src == self.pp_rank:
            return self._local.pop(key)
        if key not in self._recvs:
            raise RuntimeError(f"receive of {key} from pipeline rank {src} was never posted")
        return self._recvs.pop(key).wait()

    def send(self, messages: Sequence[tuple[MessageKey, torch.Tensor, int]]) -> None:
        """Post ``(key, tensor, dst)`` sends, one batch per channel; returns at once."""
        ops, tensors = [], []
        for key, tensor, dst in messages:
            tensor = tensor.detach()
            if dst == self.pp_rank:
                self._local[key] = tensor
                continue
            tensor = tensor.contiguous()
            channel = Channel(self.pp_rank, dst, key[0])
            ops.append((channel, self._op(dist.isend, tensor, key, channel, dst)))
            tensors.append((channel, tensor))
        for batch_ops, batch_tensors in zip(_by_channel(ops).values(), _by_channel(tensors).values()):
            works = _Works(dist.batch_isend_irecv(batch_ops))
            if self._releaser is not None:
                def release(works: _Works = works, tensors: list = batch_tensors) -> None:
                    works.wait()  # the job, and with it ``tensors``, is dropped right after

                self._releaser.submit(release)
            else:
                self._sends.append((works, batch_tensors))

    def poll_sends(self) -> None:
        """Drop the tensors of completed sends (gloo: done by the helper thread)."""
        self._sends = [(w, t) for w, t in self._sends if not w.completed()]

    def finish(self) -> None:
        """Wait for every send; check nothing is left over."""
        for works, _ in self._sends:
            works.wait()
        self._sends = []
        for helper in (self._poster, self._releaser):
            if helper is not None:
                helper.join()
        if self._recvs or self._local:
            left = sorted(self._recvs) + sorted(self._local)
            self._recvs, self._local = {}, {}
            raise RuntimeError(f"messages posted but never used this step: {left}")
