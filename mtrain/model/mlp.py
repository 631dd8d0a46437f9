"""Dense SwiGLU feed-forward layer, tensor parallel."""
from __future__ import annotations

import torch
from torch import nn

from mtrain.model.activations import swiglu
from mtrain.model.compiled import compiled
from mtrain.model.tp import ColumnParallelLinear, Group, RowParallelLinear, copy_to_tp


class DenseMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``: gate and up split by output features, down by input features.

    ``fp8``: the three GEMMs are FP8, and the SwiGLU's inputs are kept in FP8
    and its output recomputed for the backward (docs/fp8.md).
    """

    def __init__(self, hidden: int, ffn_hidden: int, tp_group: Group, init_std: float, compile: bool = False,
                 fp8: bool = False):
        super().__init__()
        self._act = compiled(swiglu, compile)
        self.tp_group = tp_group
        self.gate = ColumnParallelLinear(hidden, ffn_hidden, tp_group, init_std, fp8=fp8)
        self.up = ColumnParallelLinear(hidden, ffn_hidden, tp_group, init_std, fp8=fp8)
        self.down = RowParallelLinear(ffn_hidden, hidden, tp_group, init_std, fp8=fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, self.tp_group)  # one gradient all-reduce for both column layers
        gate, up = self.gate.forward_copied(x), self.up.forward_copied(x)
        if self.down.fp8:
            return self.down.forward_fp8_swiglu(gate, up)
        return self.down(self._act(gate, up))
