"""The feed-forward activation shared by the dense MLP and the experts."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
