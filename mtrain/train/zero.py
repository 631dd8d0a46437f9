"""ZeRO-1 traffic: gradients reduce-scattered to their owners, updated
parameters all-gathered back, in contiguous per-rank blocks.

Every parameter replicated over a group (``dp`` for dense parameters,
``expert_dp`` for experts) has one owner in it (:func:`assign_owners`, by
size). An :class:`OwnerLayout` lays a group's parameters out rank by rank:
rank i's owned tensors back to back, padded to the longest rank's length, so
one ``reduce_scatter`` leaves each owner exactly the summed gradients it
updates, and one ``all_gather`` gives every rank the updated parameters.
Each moves the bytes of the parameters once, against the all-reduce (twice)
and a broadcast per parameter it replaces. The optimizer states stay per
parameter, so checkpoints reshard as before.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from mtrain.model.params import meta


def replica_kind(param) -> str:
    return "expert_dp" if meta(param).expert else "dp"


def assign_owners(params: dict, group_sizes: dict[str, int]) -> dict[str, int]:
    """Name -> owner index inside the parameter's replica group (greedy by size,
    deterministic: every rank of a group computes the same assignment)."""
    load = {kind: [0] * size for kind, size in group_sizes.items()}
    owners = {}
    for name in sorted(params, key=lambda n: (-params[n].numel(), n)):
        kind = replica_kind(params[name])
        idx = min(range(len(load[kind])), key=lambda i: (load[kind][i], i))
        load[kind][idx] += params[name].numel()
        owners[name] = idx
    return owners


# torch renamed the tensor forms (``*_into_tensor`` -> ``*_single``); use what this torch has,
# looked up at each call (so a wrapper installed later, e.g. mtrain.testing.devices, sees it).
def _reduce_scatter(*args, **kwargs):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


def _all_gather(*args, **kwargs):
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


class OwnerLayout:
    """The parameters of one replica group, rank by rank, for ``size`` ranks."""

    def __init__(self, names_by_owner: list[list[str]], numel: Callable[[str], int]):
        self.names_by_owner = names_by_owner
        self.block = max((sum(numel(n) for n in names) for names in names_by_owner), default=0)
        self.padding = sum(self.block - sum(numel(n) for n in names) for names in names_by_owner)

    def _pack_block(self, tensors: dict[str, torch.Tensor], rank: int, out: torch.Tensor) -> None:
        offset = 0
        for name in self.names_by_owner[rank]:
            t = tensors[name]
            out[offset:offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()

    def _unpack_block(self, block: torch.Tensor, tensors: dict[str, torch.Tensor], rank: int) -> None:
        offset = 0
        for name in self.names_by_owner[rank]:
            t = tensors[name]
            t.copy_(block[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def _ring_bytes(self, element_size: int) -> int:
        """What one rank sends in a ring reduce-scatter or all-gather of the layout."""
        return (len(self.names_by_owner) - 1) * self.block * element_size

    def reduce_scatter(self, grads: dict[str, torch.Tensor], group, my_rank: int,
                       dtype: torch.dtype | None = None) -> int:
        """Sum ``grads`` over the group into the owners' tensors (others keep
        their own partial values). ``dtype``: the buffer the sum is packed,
        sent and computed in (bf16 for ``parallel.grad_reduce_dtype=bf16``),
        written back into ``grads``; default theirs. Returns the bytes this
        rank sends."""
        if not self.block:
            return 0
        some = next(iter(grads.values()))
        flat = torch.zeros(self.block * len(self.names_by_owner), dtype=dtype or some.dtype, device=some.device)
        for rank in range(len(self.names_by_owner)):
            self._pack_block(grads, rank, flat[rank * self.block:(rank + 1) * self.block])
        mine = flat.new_empty(self.block)
        _reduce_scatter(mine, flat, group=group)
        self._unpack_block(mine, grads, my_rank)
        return self._ring_bytes(flat.element_size())

    def all_gather(self, params: dict[str, torch.Tensor], group, my_rank: int) -> int:
        """Every rank's owned ``params`` to every rank. Returns the bytes this rank sends."""
        if not self.block:
            return 0
        some = next(iter(params.values()))
        mine = torch.zeros(self.block, dtype=some.dtype, device=some.device)
        self._pack_block(params, my_rank, mine)
        flat = mine.new_empty(self.block * len(self.names_by_owner))
        _all_gather(flat, mine, group=group)
        for rank in range(len(self.names_by_owner)):
            if rank != my_rank:
                self._unpack_block(flat[rank * self.block:(rank + 1) * self.block], params, rank)
        return self._ring_bytes(flat.element_size())


def owner_layouts(params: dict, owner_index: dict[str, int], sizes: dict[str, int]) -> dict[tuple, OwnerLayout]:
    """(kind, dtype) -> layout of the parameters replicated over ``kind``
    (groups larger than one rank only), in sorted name order per owner."""
    layouts = {}
    for kind, size in sizes.items():
        if size <= 1:
            continue
        for dtype in sorted({p.dtype for p in params.values()}, key=str):
            names = [n for n in sorted(params) if replica_kind(params[n]) == kind and params[n].dtype == dtype]
            if not names:
                continue
            by_owner = [[n for n in names if owner_index[n] == r] for r in range(size)]
            layouts[(kind, dtype)] = OwnerLayout(by_owner, lambda n: params[n].numel())
    return layouts
