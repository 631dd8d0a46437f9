"""Tensor-parallel primitives: collectives with matching gradients, and the split layers.

``group`` is a ``torch.distributed`` process group or ``None``; ``None`` and a
group of one rank mean no tensor parallelism and no communication.

Conventions (Megatron's): activations entering a TP region are replicated on
every TP rank. A column-parallel layer computes its share of output features
from the replicated input; a row-parallel layer consumes those shares and
all-reduces the partial sums back to a replicated output. The matching
autograd pairs make the gradient of every replicated tensor complete (the same
on all TP ranks): ``copy_to_tp`` sums input gradients where a replicated
tensor enters a sharded computation, ``reduce_from_tp`` passes gradients
through where partial results are summed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from mtrain.model.fp8_linear import fp8_linear, fp8_swiglu_linear
from mtrain.model.params import tag
from mtrain.runtime.wgrad import linear

Group = Optional[dist.ProcessGroup]


def tp_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def local_linear(fp8: bool):
    """This rank's GEMM of a linear layer: :func:`mtrain.model.fp8_linear.fp8_linear`
    (``train.fp8=blockwise``, docs/fp8.md) or :func:`mtrain.runtime.wgrad.linear`.
    Both defer their weight gradient alike."""
    return fp8_linear if fp8 else linear


def divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of ``tp`` so every rank holds as many rows."""
    return -(-vocab_size // tp) * tp


# --- collectives on tensors (no autograd) -------------------------------------------------

def _all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(tp_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = tp_size(group)
    divide(x.shape[dim], n, f"size of dim {dim}")
    return x.chunk(n, dim=dim)[tp_rank(group)].contiguous()


# --- autograd pairs -------------------------------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward."""
    return x if tp_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward."""
    return x if tp_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` forward; keep this rank's slice of the gradient backward."""
    return x if tp_size(group) == 1 else _GatherFromTP.apply(x, dim, group)


def scatter_to_tp(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Keep this rank's chunk of ``dim`` forward; all-gather the gradient backward."""
    return x if tp_size(group) == 1 else _ScatterToTP.apply(x, dim, group)


# --- layers ---------------------------------------------------------------------------------

def _normal(shape: tuple[int, ...], init_std: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).normal_(0.0, init_std))


class ReplicatedLinear(nn.Module):
    """``y = x W^T`` with the whole weight on every TP rank (untagged).

    Inside a TP region, wrap its output with :func:`copy_to_tp` where it feeds
    per-rank computation, so its gradient is summed over the ranks. ``fp8``:
    the GEMMs run through :func:`mtrain.model.fp8_linear.fp8_linear` (``in_f`` a
    multiple of 128).
    """

    def __init__(self, in_f: int, out_f: int, init_std: float, fp8: bool = False):
        super().__init__()
        self.weight = _normal((out_f, in_f), init_std)
        self.fp8 = fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_linear(self.fp8)(x, self.weight)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with W's output features split over the TP ranks.

    Weight ``[out_f / tp, in_f]``; the output holds this rank's features unless
    ``gather_output``. ``fp8``: the local GEMMs are FP8 (:func:`local_linear`);
    the communication is unchanged.
    """

    def __init__(self, in_f: int, out_f: int, group: Group, init_std: float,
                 bias: bool = False, gather_output: bool = False, fp8: bool = False):
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.fp8 = fp8
        local_out = divide(out_f, tp_size(group), "output features")
        self.weight = tag(_normal((local_out, in_f), init_std), shard_dim=0, shard_group="tp")
        self.bias = tag(nn.Parameter(torch.zeros(local_out)), shard_dim=0, shard_group="tp",
                        no_decay=True) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_copied(copy_to_tp(x, self.group))

    def forward_copied(self, x: torch.Tensor) -> torch.Tensor:
        """Forward for an input already passed through :func:`copy_to_tp`.

        Several column layers reading one input share one gradient all-reduce this way.
        """
        y = local_linear(self.fp8)(x, self.weight, self.bias)
        return gather_from_tp(y, -1, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with W's input features split over the TP ranks; the output is all-reduced.

    Weight ``[out_f, in_f / tp]``. With ``input_is_parallel`` the input already
    holds this rank's features (a column-parallel output); otherwise the full
    input is split here. ``fp8``: the local GEMM is FP8 (:func:`local_linear`;
    ``in_f / tp`` a multiple of 128); the all-reduce is unchanged.
    """

    def __init__(self, in_f: int, out_f: int, group: Group, init_std: float,
                 bias: bool = False, input_is_parallel: bool = True, fp8: bool = False):
        super().__init__()
        self.group, self.input_is_parallel = group, input_is_parallel
        self.fp8 = fp8
        local_in = divide(in_f, tp_size(group), "input features")
        self.weight = tag(_normal((out_f, local_in), init_std), shard_dim=1, shard_group="tp")
        # Added after the all-reduce, so it is replicated.
        self.bias = tag(nn.Parameter(torch.zeros(out_f)), no_decay=True) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, -1, self.group)
        y = reduce_from_tp(local_linear(self.fp8)(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def forward_fp8_swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``forward(swiglu(gate, up))`` of an FP8 layer whose input is this
        rank's features, with the SwiGLU's inputs kept in FP8 and its output
        recomputed in the backward (:func:`mtrain.model.fp8_linear.fp8_swiglu_linear`)."""
        if not (self.fp8 and self.input_is_parallel):
            raise ValueError("forward_fp8_swiglu needs fp8=True and input_is_parallel=True")
        y = reduce_from_tp(fp8_swiglu_linear(gate, up, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary rows split over the TP ranks.

    Each rank looks up the ids in its row range, zeros the others, and the
    partial embeddings are summed across ranks.
    """

    def __init__(self, vocab_size: int, hidden: int, group: Group, init_std: float):
        super().__init__()
        self.group, self.vocab_size = group, vocab_size
        local_rows = padded_vocab(vocab_size, tp_size(group)) // tp_size(group)
        self.vocab_start = tp_rank(group) * local_rows
        self.weight = tag(_normal((local_rows, hidden), init_std), shard_dim=0, shard_group="tp",
                          full_size=vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        emb = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(emb.masked_fill(outside[..., None], 0.0), self.group)


class ParallelLMHead(nn.Module):
    """Output projection to this rank's share of the padded vocabulary (logits are never gathered).

    Feed its output to :func:`vocab_parallel_cross_entropy`.
    """

    def __init__(self, hidden: int, vocab_size: int, group: Group, init_std: float):
        super().__init__()
        self.group, self.vocab_size = group, vocab_size
        local_rows = padded_vocab(vocab_size, tp_size(group)) // tp_size(group)
        self.weight = tag(_normal((local_rows, hidden), init_std), shard_dim=0, shard_group="tp",
                          full_size=vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(copy_to_tp(x, self.group), self.weight)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, vocab_size):
        ctx.logits_dtype = logits.dtype
        n_local = logits.shape[-1]
        start = tp_rank(group) * n_local
        columns = torch.arange(start, start + n_local, device=logits.device)
        logits = logits.float().masked_fill(columns >= vocab_size, float("-inf"))

        row_max = logits.max(dim=-1).values
        if tp_size(group) > 1:
            row_max = _all_reduce(row_max, group, dist.ReduceOp.MAX)
        shifted = logits - row_max[..., None]
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)

        local_target = targets - start
        here = (local_target >= 0) & (local_target < n_local)
        local_target = local_target.clamp(0, n_local - 1)
        picked = shifted.gather(-1, local_target[..., None]).squeeze(-1)
        target_logit = torch.where(here, picked, torch.zeros_like(picked))
        if tp_size(group) > 1:
            sum_exp = _all_reduce(sum_exp, group)
            target_logit = _all_reduce(target_logit, group)

        softmax = exp.div_(sum_exp[..., None])
        ctx.save_for_backward(softmax, local_target, here)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, here = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target[..., None], -here.to(grad.dtype)[..., None])
        grad.mul_(grad_loss[..., None])
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, group: Group,
                                 vocab_size: int) -> torch.Tensor:
    """Per-token cross entropy ``[...]`` from this rank's logits ``[..., V_padded / tp]``.

    Three all-reduces of per-token scalars (max, sum of exps, target logit)
    replace gathering the full logits. Columns with ids ``>= vocab_size``
    (padding) are excluded. Computed in fp32. A target outside
    ``[0, vocab_size)`` (e.g. an ignore index) yields the log-sum-exp and no
    target term: mask such tokens' losses.
    """
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, group, vocab_size)


@torch.no_grad()
def vocab_parallel_argmax(logits_shard: torch.Tensor, group: Group, vocab_size: int) -> torch.Tensor:
    """The id of the largest logit at every position ``[...]`` from this rank's
    logits ``[..., V_padded / tp]``, the same on every TP rank (greedy decoding).
    Padding columns are excluded; a tie goes to the lowest id. Two all-reduces
    of per-position values (max, then the lowest id holding it)."""
    n_local = logits_shard.shape[-1]
    start = tp_rank(group) * n_local
    columns = torch.arange(start, start + n_local, device=logits_shard.device)
    best, local = logits_shard.float().masked_fill(columns >= vocab_size, float("-inf")).max(dim=-1)
    ids = local + start
    if tp_size(group) > 1:
        top = _all_reduce(best, group, dist.ReduceOp.MAX)
        ids = _all_reduce(torch.where(best == top, ids, torch.full_like(ids, vocab_size)), group, dist.ReduceOp.MIN)
    return ids
