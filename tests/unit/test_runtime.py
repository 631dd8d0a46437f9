"""The runtime floor on its own: typed carries, plain vs step-by-step runs,
the per-micro-batch step context (weight-gradient sink, loss scale)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.model.moe.layer import MoELayer
from mtrain.runtime.comm import CommOp, IdentityOp, Pending
from mtrain.runtime.context import StepContext
from mtrain.model.block import LayerCarry
from mtrain.runtime.program import (Carry, Compute, Exchange, Recording, backward_steps, detached, drain,
                                    forward_steps, run_overlapped, run_plain)
from mtrain.runtime.runner import ChunkRunner
from mtrain.runtime.wgrad import linear
from mtrain.testing.toy import ToyChunk


class Scale(CommOp):
    """A linear 'exchange' multiplying by ``k``: its transpose does the same."""

    def __init__(self, k: float):
        self.k = k

    def start(self, x):
        return Pending(x * self.k)

    def start_transpose(self, grad):
        return Pending(grad * self.k)


@dataclass
class TwoLayerCarry(Carry):
    x: Optional[torch.Tensor] = None
    skip: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None


def two_layer_program(w1, w2):
    def first(c, step):
        return c.replace(x=torch.tanh(linear(c.x, w1)), skip=c.x)

    def second(c, step):
        return TwoLayerCarry(loss=(linear(c.x, w2) + c.skip).square().mean())

    return [Compute(first, "first"), Exchange("x", lambda c: Scale(3.0), "exchange"), Compute(second, "second")]


def params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 4, generator=g).requires_grad_() for _ in range(2)]


def test_plain_and_stepwise_runs_agree_bit_for_bit_and_free_activations():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = params()
    plain = run_plain(two_layer_program(*w), TwoLayerCarry(x=x), StepContext())
    plain.loss.backward()
    expected = [x.grad.clone()] + [p.grad.clone() for p in w]
    x.grad = None
    for p in w:
        p.grad = None

    rec = Recording(StepContext())
    final = drain(forward_steps(two_layer_program(*w), TwoLayerCarry(x=x), rec))
    assert torch.equal(final.loss, plain.loss)
    grads = drain(backward_steps(rec, {"loss": torch.ones(())}))
    assert torch.equal(grads["x"], expected[0])  # the exchange's transpose scaled it back
    for p, g in zip(w, expected[1:]):
        assert torch.equal(p.grad, g)
    assert all(r.inputs is None and r.outputs is None for r in rec.records)


def test_carries_detach_only_activations():
    c = TwoLayerCarry(x=torch.ones(2, requires_grad=True) * 2, skip=torch.ones(2))
    cut = detached(c)
    assert set(c.activations()) == {"x"} and cut.x.is_leaf and cut.x.requires_grad and cut.skip is c.skip
    with pytest.raises(TypeError, match="nests a tensor"):
        detached(LayerCarry(rope=(torch.ones(1, requires_grad=True) * 2, None)))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(11, (2, 3), generator=g), "labels": torch.randint(11, (2, 3), generator=g)}


def test_an_overlapped_pair_defers_only_the_backward_microbatch_into_its_own_sink():
    chunk = ToyChunk(0, 1, seed=3)
    reference = ToyChunk(0, 1, seed=3)
    for mb in (0, 1):
        out = reference.program()
        loss = run_plain(out.steps, reference.initial_carry(batch(mb), None), StepContext()).loss
        loss.backward()

    runner = ChunkRunner(chunk)
    steps = [StepContext(), StepContext()]
    runner.forward(0, batch(0), step=steps[0])
    with steps[0].deferring_weight_grads() as sink:
        run_overlapped(runner.forward_gen(1, batch(1), None, steps[1]), runner.backward_gen(0, torch.ones(())))
    assert len(sink) > 0 and steps[1].weight_grads is None
    assert chunk.w_expert.grad is None  # micro-batch 0's weight gradients wait for its W
    runner.backward(1, torch.ones(()))  # not deferring: computed now
    sink.run()
    for (name, p), q in zip(chunk.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_the_aux_loss_gradient_follows_the_step_contexts_loss_scale():
    cfg = load_config(["model.aux_loss_alpha=0.5"]).model
    torch.manual_seed(0)
    moe = MoELayer(cfg)
    x = torch.randn(2, 8, cfg.hidden_size)
    grads = []
    for scale in (1.0, 0.25):
        moe.zero_grad()
        step = StepContext(loss_scale=scale)
        (moe(x, step) * 0).sum().backward()  # only the auxiliary loss reaches the router
        assert len(step.aux_losses) == 1
        grads.append(moe.router.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], 0.25 * grads[0])


def test_identity_exchange_returns_its_input():
    t = torch.arange(3.0)
    assert IdentityOp().start(t).wait() is t
