"""AdamW with fp32 master weights and ZeRO-1 state sharding.

Each parameter is owned by one rank of its replica group (``dp`` for dense
parameters, ``expert_dp`` for experts), assigned by size so owners carry
similar loads. The gradients are reduce-scattered to their owners
(:mod:`mtrain.train.zero`); only the owner keeps the fp32 master copy and the
two moments and runs the update; one all-gather then gives every rank the new
weights. States are kept per parameter (not in flat buffers), named after the
parameter, so a checkpoint of them reshards like the weights do.
"""
from __future__ import annotations

import torch

from mtrain.model.params import meta
from mtrain.train.grads import main_grad, reduce_wire_dtype, zero_grads
from mtrain.train.zero import assign_owners, owner_layouts, replica_kind

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


class ZeroAdamW:
    def __init__(self, params: dict, groups, train_cfg, zero: bool = True):
        self.params = params
        self.groups = groups
        self.betas = (train_cfg.beta1, train_cfg.beta2)
        self.eps = train_cfg.eps
        self.weight_decay = train_cfg.weight_decay
        kinds = ("dp", "expert_dp")
        sizes = {k: (groups.size(k) if groups is not None else 1) for k in kinds}
        my_index = {k: (groups.index(k) if groups is not None else 0) for k in kinds}
        self.owner_index = assign_owners(params, sizes)
        # One rank per replica group speaks for each parameter (the gradient
        # norm counts it there), with or without ZeRO.
        self.representative = {n for n, i in self.owner_index.items() if i == my_index[replica_kind(params[n])]}
        self.zero = zero and groups is not None
        # Without ZeRO every rank keeps every state and updates every parameter.
        self.owned = self.representative if self.zero else set(params)
        self.my_index = my_index
        self.layouts = owner_layouts(params, self.owner_index, sizes) if self.zero else {}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name in sorted(self.owned):
            p = params[name]
            master = p.detach().float().clone() if p.dtype != torch.float32 else p.data
            self.state[name] = {"master": master, "exp_avg": torch.zeros_like(master),
                                "exp_avg_sq": torch.zeros_like(master)}
        self.step_count = 0

    def decays(self, name: str) -> bool:
        p = self.params[name]
        return not meta(p).no_decay and p.dim() > 1

    @torch.no_grad()
    def step(self, lr: float) -> int:
        """One AdamW update of the owned parameters; returns the bytes this rank
        sent to return them to their replicas (ZeRO-1)."""
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1 = 1 - beta1 ** self.step_count
        bias2 = 1 - beta2 ** self.step_count
        # One list per quantity in a fixed order, updated by foreach kernels
        # (a few launches instead of several per parameter; same math per element).
        names = sorted(self.owned)
        masters = [self.state[n]["master"] for n in names]
        exp_avg = [self.state[n]["exp_avg"] for n in names]
        exp_avg_sq = [self.state[n]["exp_avg_sq"] for n in names]
        grads = [main_grad(self.params[n]).float() for n in names]
        decayed = [self.state[n]["master"] for n in names if self.decays(n)]
        if decayed and self.weight_decay:
            torch._foreach_mul_(decayed, 1 - lr * self.weight_decay)
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(exp_avg_sq, bias2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(masters, exp_avg, denom, value=-lr / bias1)
        low = [n for n in names if not self._master_is_param(n)]  # fp32: the master is the parameter
        if low:
            torch._foreach_copy_([self.params[n].data for n in low], [self.state[n]["master"] for n in low])
        return self._gather_from_owners() if self.zero else 0

    def _gather_from_owners(self) -> int:
        """One all-gather per (group, dtype): every owner's updated parameters to all."""
        sent = 0
        for (kind, _), layout in sorted(self.layouts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            tensors = {n: self.params[n].data for names in layout.names_by_owner for n in names}
            sent += layout.all_gather(tensors, self.groups.group(kind), self.my_index[kind])
        return sent

    def reduce_scatter_grads(self, kind: str, reduce_dtype: str = "fp32") -> int:
        """Sum the gradients replicated over ``kind`` into their owners (the
        others keep partial sums, which nothing reads), in ``reduce_dtype``
        (``parallel.grad_reduce_dtype``, see :func:`reduce_wire_dtype`).
        Returns bytes sent."""
        sent = 0
        for (k, _), layout in sorted(self.layouts.items(), key=lambda kv: str(kv[0][1])):
            if k == kind:
                grads = {n: main_grad(self.params[n]) for names in layout.names_by_owner for n in names}
                wire = reduce_wire_dtype(next(iter(grads.values())).dtype, reduce_dtype)
                sent += layout.reduce_scatter(grads, self.groups.group(kind), self.my_index[kind], wire)
        return sent

    def zero_grad(self) -> None:
        zero_grads(self.params)

    # Checkpointing (Stateful): per-parameter tensors tagged like their
    # parameter, so they reshard like the weights, and the step count.
    def _master_is_param(self, name: str) -> bool:
        # fp32 training: the master is the parameter's own storage (``p.data``
        # is a new tensor object on every access, so compare storage).
        return self.state[name]["master"].data_ptr() == self.params[name].data_ptr()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"optim.step": torch.tensor(self.step_count, dtype=torch.int64)}
        for name, s in self.state.items():
            for key in STATE_KEYS:
                t = s[key]
                if key == "master" and self._master_is_param(name):
                    continue  # saved as the parameter itself
                t.mtrain_meta = meta(self.params[name])
                out[f"optim.{key}.{name}"] = t
        return out

    def load_state_dict(self, state: dict) -> None:
        """Take the states (the checkpointer loads into the tensors of
        ``state_dict()``, other dicts are copied) and the step count, then
        re-derive the weights from the fp32 masters (bf16 training)."""
        with torch.no_grad():
            for name, s in self.state.items():
                for key in STATE_KEYS:
                    loaded = state.get(f"optim.{key}.{name}")
                    if loaded is not None and loaded is not s[key]:
                        s[key].copy_(loaded)
                if not self._master_is_param(name):
                    self.params[name].copy_(s["master"])
        if "optim.step" in state:
            self.step_count = int(state["optim.step"])
