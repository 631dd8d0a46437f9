"""Gradient reduction across replicas, and the global gradient norm.

Which ranks hold a copy of a parameter follows from its tag and the rank's
:class:`~mtrain.pipeline.schedule_rules.Placement`: dense parameters are
replicated over ``dp``, expert parameters over ``expert_dp`` (split, never
replicated, over ``expert_tp``); DualPipe holds every stage twice
(``stage_copy``); where first and last stage sit on different ranks and the
model has MTP, the last stage keeps a copy of the embedding (``embedding``).
Every copy must end the step with the same gradient, and the norm must count
each logical parameter exactly once.

Main gradients (Megatron's ``main_grad``): a 16-bit parameter gets an fp32
buffer; each backward's gradient is added to it as soon as autograd (or a
deferred W) produces it, so accumulation over micro-batches, the reduction
over replicas, the norm and the optimizer all work in fp32. fp32 parameters
keep using ``.grad``.

``parallel.grad_reduce_dtype=bf16`` (Megatron's ``grad_reduce_in_bf16``,
torchtitan's ``reduce_dtype``) halves the traffic of the sums over replicas:
each bucket of fp32 gradients is packed into a bf16 buffer, reduced in bf16
and written back into the fp32 gradients. Accumulation, averaging, norm and
optimizer stay in fp32.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mtrain.model.params import meta


def attach_main_grads(params: dict) -> list:
    """Give every non-fp32 parameter an fp32 ``main_grad`` that collects its
    gradients; returns the hook handles."""
    handles = []
    for p in params.values():
        if p.dtype == torch.float32:
            continue
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
        handles.append(p.register_post_accumulate_grad_hook(_move_to_main_grad))
    return handles


def _move_to_main_grad(p: torch.Tensor) -> None:
    if p.grad is not None:  # None when the backward deferred this weight's gradient
        p.main_grad.add_(p.grad)
        p.grad = None


def main_grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient the step works with: the fp32 main gradient, or ``.grad``."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def zero_grads(params: dict) -> None:
    for p in params.values():
        p.grad = None
        main = getattr(p, "main_grad", None)
        if main is not None:
            main.zero_()


REDUCE_DTYPES = ("fp32", "bf16")  # parallel.grad_reduce_dtype


def reduce_wire_dtype(grad_dtype: torch.dtype, reduce_dtype: str = "fp32") -> torch.dtype:
    """The dtype gradients of ``grad_dtype`` are summed over replicas in:
    their own for ``fp32``; for ``bf16``, bf16 whenever they are wider."""
    if str(reduce_dtype) not in REDUCE_DTYPES:
        raise ValueError(f"grad_reduce_dtype={str(reduce_dtype)!r}: choose one of {', '.join(REDUCE_DTYPES)}")
    if str(reduce_dtype) == "bf16" and grad_dtype.is_floating_point and grad_dtype.itemsize > 2:
        return torch.bfloat16
    return grad_dtype


def _all_reduce_bucket(tensors: list[torch.Tensor], group, wire: torch.dtype) -> int:
    """Sum ``tensors`` over ``group`` in one flat ``wire``-dtype buffer; returns its bytes."""
    if wire == tensors[0].dtype:
        flat = _flatten_dense_tensors(tensors)
    else:  # packed straight into the narrower buffer, no full-width copy
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=wire, device=tensors[0].device)
        offset = 0
        for t in tensors:
            flat[offset:offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
    dist.all_reduce(flat, group=group)
    for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(reduced)  # back into the (fp32) gradient
    return flat.numel() * flat.element_size()


def reduce_gradients(params: dict, groups, placement, scatter=None, reduce_dtype: str = "fp32") -> int:
    """Sum gradients over every replica group (one flat all-reduce per group
    kind), then average over data parallelism: each rank's loss is a mean over
    its own tokens, the global loss is the mean over the dp replicas.

    ``scatter`` (ZeRO-1: the optimizer's ``reduce_scatter_grads``, called as
    ``scatter(kind, reduce_dtype)``) takes over the ``dp`` and ``expert_dp``
    sums, leaving each sum on the parameter's owner only; they run last, after
    the copies of a stage (whose pairs share a data-parallel index) have been
    summed. ``reduce_dtype`` (``parallel.grad_reduce_dtype``): the dtype the
    sums are computed and sent in, see :func:`reduce_wire_dtype`; the division
    by dp follows, as always, in the gradients' own dtype. Returns the bytes
    this rank sends (on a ring).
    """
    for p in params.values():
        if main_grad(p) is None:
            p.grad = torch.zeros_like(p)
    reduce_wire_dtype(torch.float32, reduce_dtype)  # an unknown name fails here, even on one rank
    if groups is None:
        return 0
    buckets: dict[tuple[str, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for name in sorted(params):
        p = params[name]
        for kind in placement.replica_groups(name, meta(p).expert):
            if groups.size(kind) > 1:
                buckets[(kind, main_grad(p).dtype)].append(main_grad(p))
    replica_kinds = ("dp", "expert_dp")
    order = sorted(buckets, key=lambda key: (key[0] in replica_kinds, key[0], str(key[1])))
    sent, scattered = 0, set()
    for kind, dtype in order:
        if scatter is not None and kind in replica_kinds:
            if kind not in scattered:
                sent += scatter(kind, reduce_dtype)
                scattered.add(kind)
            continue
        grads = buckets[(kind, dtype)]
        nbytes = _all_reduce_bucket(grads, groups.group(kind), reduce_wire_dtype(dtype, reduce_dtype))
        n = groups.size(kind)  # a ring all-reduce sends 2(n-1)/n of the data
        sent += 2 * (n - 1) * nbytes // n
    dp = groups.size("dp")
    if dp > 1:
        for p in params.values():
            main_grad(p).div_(dp)
    return sent


def global_grad_norm(params: dict, counted: set, representative: set, groups) -> torch.Tensor:
    """sqrt of the sum of squared gradients over every logical parameter once.

    ``counted``: names this rank speaks for among its pipeline copies
    (:meth:`Placement.speaks_for`: second copies and the MTP embedding copy excluded); ``representative``: names this
    rank speaks for in their replica group (one rank per group). Dense
    parameters replicated over TP are counted on TP index 0 only, TP shards
    everywhere; likewise expert parameters over expert_tp.
    """
    device = next(iter(params.values())).device
    grads = []
    for name in sorted(counted & representative):  # fixed order: bit-exact resumes
        p = params[name]
        m = meta(p)
        split_kind = "expert_tp" if m.expert else "tp"
        if m.shard_group != split_kind and groups is not None and groups.index(split_kind) != 0:
            continue
        grads.append(main_grad(p))
    total = torch.zeros((), dtype=torch.float64, device=device)
    if grads:
        # One norm per tensor (foreach: a few launches, no fp64 copy of every
        # gradient), then their squares summed in fp64 in the fixed order.
        total = torch.stack(torch._foreach_norm(grads, 2.0)).double().pow(2).sum()
    if groups is not None:
        dist.all_reduce(total)
    return total.sqrt()
