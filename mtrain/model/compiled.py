"""``model.compile``: the work between the GEMMs, compiled with torch.compile.

mtrain compiles regions, not whole layers. Every linear layer and the routed
experts' grouped GEMM are autograd functions whose weight gradient a
zero-bubble schedule defers to its W pass (:mod:`mtrain.runtime.wgrad`); the
MoE dispatch plan reads the exchanged counts back once per layer; the
exchanges are collectives. Those stay eager. What lies between them is
compiled: RMSNorm, rotary embedding with the attention core, the SwiGLU
activation, and the router (scores, group-limited top-k, gates, load and the
sequence-wise auxiliary loss), which is where fusion pays (one kernel for a
chain of element-wise ops, no fp32 temporaries written out).

Each region is a plain function of tensors, compiled once per process and
shared by every layer (parameters are arguments, not guarded constants).
``fullgraph=True`` turns any graph break into an error. Row counts of the
expert activations change every step; :func:`rows_vary` marks that dimension
dynamic, so no count recompiles a region.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch


def compiled(fn: Callable, enabled: bool) -> Callable:
    """``fn`` compiled (shared, built on first use) when ``enabled``, else ``fn`` itself."""
    return _compile(fn) if enabled else fn


@functools.cache
def _compile(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True)


def rows_vary(x: torch.Tensor) -> torch.Tensor:
    """Mark dim 0 (rows: tokens routed to this rank's experts) dynamic, so a new
    count does not recompile the region that takes ``x``."""
    if x.shape[0] > 1:  # torch specialises sizes 0 and 1 whatever the mark
        torch._dynamo.maybe_mark_dynamic(x, 0)
    return x
