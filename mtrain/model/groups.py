"""What a model needs of the run's parallel layout: its process groups and
the runtime choices made with them (a single rank when left at the defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelGroups:
    """The process groups the model talks over (None: a single rank)."""

    tp: Optional[object] = None
    ep: Optional[object] = None
    expert_tp: Optional[object] = None
    dispatcher: str = "auto"
    deepep_num_sms: int = 20
    ep_nodes: int = 1  # nodes the EP group spans (node-limited routing)
    # (node, rail) groups of the two-level dispatch: the EP ranks of this rank's
    # node, and those of its index inside the node (one per node). None: one level.
    ep_hops: Optional[tuple] = None
    # train.fp8=blockwise: the dense linears (attention projections, dense and
    # shared-expert MLPs, MTP proj) and the routed experts run the FP8 reference
    # GEMMs, and the dispatch carries FP8 tiles (docs/fp8.md).
    fp8: bool = False
