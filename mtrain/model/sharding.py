"""Cut a full (single-rank) state dict into this rank's shards, reading parameter tags.

The model is built and initialised once with full shapes (the same seed gives
the same weights everywhere); every rank then keeps its slices. ``coords``
maps a group name (``"tp"``, ``"ep"``, ``"expert_tp"``) to this rank's
``(index, size)`` in it; a group not named counts as ``(0, 1)``.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from mtrain.model.params import ParamMeta, meta

Coords = Mapping[str, tuple[int, int]]


def _chunk(t: torch.Tensor, dim: int, index: int, size: int, name: str) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} does not split into {size} equal shards")
    step = t.shape[dim] // size
    return t.narrow(dim, index * step, step)


def _pad_to_multiple(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    missing = -t.shape[dim] % multiple
    if not missing:
        return t
    # F.pad lists (before, after) pairs from the last dim backwards.
    pads = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pads)


def shard_tensor(full: torch.Tensor, m: ParamMeta, coords: Coords, name: str = "tensor") -> torch.Tensor:
    """This rank's part of ``full`` as described by the tag ``m``."""
    out = full
    if m.expert:
        index, size = coords.get("ep", (0, 1))
        out = _chunk(out, 0, index, size, name)
    if m.shard_dim is not None:
        index, size = coords.get(m.shard_group, (0, 1))
        if m.full_size is not None:
            out = _pad_to_multiple(out, m.shard_dim, size)
        out = _chunk(out, m.shard_dim, index, size, name)
    return out.clone()


def shard_full_state_dict(model: nn.Module, full_state_dict: Mapping[str, torch.Tensor],
                          coords: Coords) -> dict[str, torch.Tensor]:
    """The state dict ``model`` (built for this rank) should load, cut from the full one."""
    local = model.state_dict(keep_vars=True)
    missing = sorted(set(local) - set(full_state_dict))
    if missing:
        raise KeyError(f"the full state dict lacks {missing}")
    out = {}
    for name, mine in local.items():
        shard = shard_tensor(full_state_dict[name], meta(mine), coords, name)
        if shard.shape != mine.shape:
            raise ValueError(f"{name}: the shard has shape {tuple(shard.shape)} but this rank's "
                             f"module holds {tuple(mine.shape)}; check coords {dict(coords)}")
        out[name] = shard
    return out


def load_full_state_dict(model: nn.Module, full_state_dict: Mapping[str, torch.Tensor], coords: Coords) -> None:
    """Load this rank's shards of ``full_state_dict`` into ``model`` (strict)."""
    model.load_state_dict(shard_full_state_dict(model, full_state_dict, coords), strict=True)
