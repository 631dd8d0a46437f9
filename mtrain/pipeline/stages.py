"""Build the model chunks one rank holds, for any layout and schedule.

Which (stage, direction) chunks a pipeline rank holds comes from its
:class:`~mtrain.pipeline.schedule_rules.Placement`. Where one rank holds both
a first and a last stage (DualPipe's and DualPipeV's end ranks), one
embedding module serves both chunks.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from mtrain.model.groups import ModelGroups
from mtrain.model.model import ModelChunk, initialize
from mtrain.model.partition import stage_layers
from mtrain.parallel.env import ep_nodes, ranks_per_node
from mtrain.pipeline.schedule_rules import placement

ChunkKey = tuple[int, int]  # (stage, direction)


def coords_of(groups) -> dict:
    """This rank's (index, size) in the groups parameters are sharded over."""
    if groups is None:
        return {}
    return {kind: (groups.index(kind), groups.size(kind)) for kind in ("tp", "ep", "expert_tp")}


def model_groups(cfg, groups) -> ModelGroups:
    fp8 = cfg.train.fp8 == "blockwise"
    if groups is None:
        return ModelGroups(dispatcher=cfg.parallel.dispatcher, deepep_num_sms=cfg.parallel.deepep_num_sms, fp8=fp8)
    p = cfg.parallel
    ep = groups.size("ep")
    nodes = ep_nodes(ep, groups.size("tp"), ranks_per_node(), p.ep_ranks_per_node)
    hops = p.dispatch_hops or (2 if nodes > 1 else 1)
    # The two-level exchange is the alltoall backend's (DeepEP crosses nodes its own way).
    two_level = hops == 2 and ep > 1 and str(p.dispatcher) in ("auto", "alltoall")
    return ModelGroups(tp=groups.group("tp"), ep=groups.group("ep"), expert_tp=groups.group("expert_tp"),
                       dispatcher=p.dispatcher, deepep_num_sms=p.deepep_num_sms, ep_nodes=nodes,
                       ep_hops=groups.ep_hops(ep // nodes) if two_level else None, fp8=fp8)


def build_chunks(cfg, groups=None, pp_rank: int = 0, seed: Optional[int] = None) -> dict[ChunkKey, ModelChunk]:
    """The chunks of pipeline rank ``pp_rank``, keyed by (stage, direction),
    initialised from ``seed`` (default ``cfg.train.seed``) so that every layout
    starts from the same weights."""
    p, m = cfg.parallel, cfg.model
    place = placement(p.schedule, p.pp, pp_rank, mtp=m.mtp_depth > 0)
    layers = stage_layers(m.num_layers, place.num_stages, p.pipeline_layout)
    mg = model_groups(cfg, groups)
    chunks: dict[ChunkKey, ModelChunk] = {}
    embedding: Optional[nn.Module] = None
    # Build first stages first so a last stage on the same rank can share their embedding.
    for stage, direction in sorted(place.chunk_keys):
        chunk = ModelChunk(m, layers[stage], stage, place.is_first(stage), place.is_last(stage), mg,
                           shared_embedding=embedding)
        if hasattr(chunk, "embed"):
            embedding = chunk.embed
        chunks[(stage, direction)] = chunk
    seed = cfg.train.seed if seed is None else seed
    for chunk in chunks.values():
        initialize(chunk, seed, m.init_std, coords_of(groups))
    return chunks


def unique_parameters(chunks) -> dict[str, nn.Parameter]:
    """Global name -> parameter over all chunks; a stage held twice on a rank
    never happens, but the shared embedding appears in two chunks once here."""
    params: dict[str, nn.Parameter] = {}
    for chunk in chunks.values():
        for name, param in chunk.named_parameters():
            params.setdefault(name, param)
    return params
