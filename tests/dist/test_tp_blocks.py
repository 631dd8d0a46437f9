"""Tensor-parallel blocks against their single-process reference.

Every rank builds the full module from the same seed (the reference), cuts
its shards out of the full state dict, and runs both on the same input. The
TP output and input gradient must match the reference on every rank, and
each parameter gradient must match its slice of the reference gradient.
Tolerance (fp32, different summation order): rtol 1e-5, atol 1e-6.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from mtrain.config.loading import load_config
from mtrain.model.attention import MLAttention
from mtrain.model.mlp import DenseMLP
from mtrain.model.rope import rope_tables
from mtrain.model.sharding import load_full_state_dict, shard_full_state_dict
from mtrain.model.tp import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                             vocab_parallel_cross_entropy)
from mtrain.parallel.groups import create_groups
from mtrain.parallel.layout import build_layout
from mtrain.testing import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)


def tp_group_and_coords():
    groups = create_groups(build_layout(dist.get_world_size(), tp=dist.get_world_size()), timeout_s=30)
    return groups.group("tp"), {"tp": (groups.index("tp"), groups.size("tp"))}


def build_pair(make, seed=0):
    """``(reference, tp_module)`` holding the same weights; ``make(group)`` builds one."""
    group, coords = tp_group_and_coords()
    torch.manual_seed(seed)
    reference = make(None)
    parallel = make(group)
    load_full_state_dict(parallel, reference.state_dict(), coords)
    return reference, parallel, coords


def assert_param_grads_match(reference: nn.Module, parallel: nn.Module, coords) -> int:
    expected = shard_full_state_dict(parallel, {n: p.grad for n, p in reference.named_parameters()}, coords)
    count = 0
    for name, p in parallel.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], **TOL, msg=lambda m: f"{name}: {m}")
        count += 1
    return count


def run_both(reference, parallel, make_input, call):
    """Forward both on the same input with a weighted-sum loss; return the outputs and input grads."""
    results = []
    for module in (reference, parallel):
        x = make_input().requires_grad_(True)
        out = call(module, x)
        weights = torch.linspace(-1.0, 2.0, out.numel()).view_as(out)
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad))
    return results


def _mla_matches(cfg):
    reference, parallel, coords = build_pair(lambda g: MLAttention(cfg, g))
    cos, sin = rope_tables(cfg, 6)
    torch.manual_seed(1)
    x = torch.randn(2, 6, cfg.hidden_size)
    (ref_out, ref_dx), (tp_out, tp_dx) = run_both(reference, parallel, lambda: x.clone(),
                                                  lambda m, inp: m(inp, cos, sin))
    torch.testing.assert_close(tp_out, ref_out, **TOL)
    torch.testing.assert_close(tp_dx, ref_dx, **TOL)
    return assert_param_grads_match(reference, parallel, coords)


@pytest.mark.parametrize("world,overrides", [
    (2, []),
    (2, ["model.q_lora_rank=0"]),
    (2, ["model.recompute=selective"]),
    (4, []),  # one head per rank
])
def test_mla_matches_single_process(world, overrides):
    cfg = load_config(overrides).model
    counts = run_distributed(_mla_matches, world, cfg, timeout=60)
    assert counts == [5 if "model.q_lora_rank=0" in overrides else 7] * world


def _dense_mlp_matches():
    reference, parallel, coords = build_pair(lambda g: DenseMLP(64, 128, g, 0.05))
    torch.manual_seed(1)
    x = torch.randn(3, 5, 64)
    (ref_out, ref_dx), (tp_out, tp_dx) = run_both(reference, parallel, lambda: x.clone(), lambda m, inp: m(inp))
    torch.testing.assert_close(tp_out, ref_out, **TOL)
    torch.testing.assert_close(tp_dx, ref_dx, **TOL)
    return assert_param_grads_match(reference, parallel, coords)


def test_dense_mlp_matches_single_process():
    assert run_distributed(_dense_mlp_matches, 2, timeout=60) == [3, 3]


class GatherThenScatter(nn.Module):
    """Column layer with a gathered output feeding a row layer that splits its input; both with biases."""

    def __init__(self, group):
        super().__init__()
        self.column = ColumnParallelLinear(8, 12, group, 0.1, bias=True, gather_output=True)
        self.row = RowParallelLinear(12, 6, group, 0.1, bias=True, input_is_parallel=False)
        with torch.no_grad():  # non-zero biases so their gradients and slices matter
            self.column.bias.normal_()
            self.row.bias.normal_()

    def forward(self, x):
        return self.row(torch.tanh(self.column(x)))


def _gather_scatter_matches():
    reference, parallel, coords = build_pair(GatherThenScatter)
    torch.manual_seed(1)
    x = torch.randn(4, 8)
    (ref_out, ref_dx), (tp_out, tp_dx) = run_both(reference, parallel, lambda: x.clone(), lambda m, inp: m(inp))
    torch.testing.assert_close(tp_out, ref_out, **TOL)
    torch.testing.assert_close(tp_dx, ref_dx, **TOL)
    return assert_param_grads_match(reference, parallel, coords)


def test_gathered_column_and_scattered_row_match_single_process():
    assert run_distributed(_gather_scatter_matches, 2, timeout=60) == [4, 4]


class TinyLM(nn.Module):
    """Embedding -> tanh -> head -> per-token vocab-parallel cross entropy."""

    def __init__(self, vocab, hidden, group):
        super().__init__()
        self.group, self.vocab = group, vocab
        self.embedding = VocabParallelEmbedding(vocab, hidden, group, 0.5)
        self.head = ParallelLMHead(hidden, vocab, group, 0.5)

    def logits(self, ids):
        return self.head(torch.tanh(self.embedding(ids)))

    def forward(self, ids, targets):
        return vocab_parallel_cross_entropy(self.logits(ids), targets, self.group, self.vocab)


def _vocab_parallel_matches(vocab):
    reference, parallel, coords = build_pair(lambda g: TinyLM(vocab, 16, g))
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 7))
    targets = torch.randint(0, vocab, (3, 7))
    ids[0, :2] = torch.tensor([0, vocab - 1])  # first and last rows of the table
    targets[0, :2] = torch.tensor([vocab - 1, 0])
    losses = []
    for model in (reference, parallel):
        loss = model(ids, targets)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **TOL)
    # The reference loss is torch's cross entropy over the full logits.
    full_logits = reference.logits(ids).detach()
    expected = torch.nn.functional.cross_entropy(full_logits.view(-1, vocab), targets.view(-1), reduction="none")
    torch.testing.assert_close(losses[0], expected.view_as(losses[0]), **TOL)
    # This rank's logits are its slice of the padded vocabulary.
    index, size = coords["tp"]
    local = parallel.logits(ids).detach()
    width = local.shape[-1]
    padded = torch.nn.functional.pad(full_logits, (0, width * size - vocab))
    torch.testing.assert_close(local, padded[..., index * width:(index + 1) * width], **TOL)
    return assert_param_grads_match(reference, parallel, coords)


@pytest.mark.parametrize("world,vocab", [(2, 1023), (4, 1021)])
def test_vocab_parallel_embedding_head_and_loss_match_single_process(world, vocab):
    assert run_distributed(_vocab_parallel_matches, world, vocab, timeout=60) == [2] * world
