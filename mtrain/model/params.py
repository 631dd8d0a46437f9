"""What every parameter carries about how it is split across ranks.

Modules tag their parameters with :func:`tag`; sharding a full (single-rank)
state dict, gradient reduction, ZeRO and checkpoint resharding all read the
tags instead of knowing module internals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ParamMeta:
    # Dimension split across ``shard_group`` (None: replicated there).
    shard_dim: Optional[int] = None
    # Which group the shards span: "tp" for dense TP layers, "expert_tp" for
    # expert weights' inner split. Expert weights are also split over "ep" along
    # dim 0 (the local-expert dimension) when ``expert`` is set.
    shard_group: Optional[str] = None
    expert: bool = False
    # Rows beyond this count along ``shard_dim`` are padding (vocab padding).
    full_size: Optional[int] = None
    # Excluded from weight decay (norms, biases, router bias).
    no_decay: bool = False


DEFAULT_META = ParamMeta()


def tag(param: torch.Tensor, **fields) -> torch.Tensor:
    param.mtrain_meta = ParamMeta(**fields)
    return param


def meta(param: torch.Tensor) -> ParamMeta:
    return getattr(param, "mtrain_meta", DEFAULT_META)
