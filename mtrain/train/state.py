"""Checkpointed components that have no class of their own elsewhere.

Each implements ``torch.distributed.checkpoint.stateful.Stateful``
(``state_dict()`` / ``load_state_dict(state)``). :class:`TensorState` and
:class:`ModelState` are *sharded* components: their state is global name ->
this rank's local tensor, which the checkpointer saves as logical tensors and
loads in place. :class:`RNGState` and :class:`Progress` are small *per-rank*
state (see :mod:`mtrain.train.checkpoint`).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn


def copy_into(target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the tensors of ``target`` with the same names; the
    checkpointer loads into the tensors themselves, so those need no copy."""
    with torch.no_grad():
        for name, tensor in target.items():
            if name in state and state[name] is not tensor:
                tensor.copy_(state[name])


class TensorState:
    """A fixed mapping of global name -> local tensor."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = dict(tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        copy_into(self.tensors, state)


class ModelState(TensorState):
    """The model on this rank: its parameters and the routers' ``expert_bias``
    buffers (updated outside the optimizer, so not parameters)."""

    def __init__(self, params: Mapping[str, nn.Parameter], chunks: Iterable[nn.Module]):
        tensors = dict(params)
        for chunk in chunks:
            for name, buf in chunk.named_buffers():
                if name.endswith("expert_bias"):
                    tensors.setdefault(name, buf)
        super().__init__(tensors)


class RNGState:
    """The CPU generator's state and, on GPU, the current device's.

    The states are tied to the rank that drew from them, so they are restored
    only when the world size is unchanged; otherwise the generators keep the
    seeds this run started with.
    """

    def __init__(self, device: torch.device, world_size: int):
        self.device = torch.device(device)
        self.world_size = world_size

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"world_size": self.world_size, "cpu": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("world_size") != self.world_size:
            return
        torch.set_rng_state(state["cpu"])
        if state.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


class Progress:
    """How far training got: the number of completed steps."""

    def __init__(self, step: int = 0):
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping) -> None:
        self.step = int(state["step"])
