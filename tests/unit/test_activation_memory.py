"""Activation memory of the step-by-step runtime against plain autograd,
counted exactly as live tensor bytes (mtrain.testing.memory.LiveTensorMemory)."""
import dataclasses

import torch

from mtrain.config.loading import load_config
from mtrain.model.moe.layer import MoECarry, MoELayer
from mtrain.runtime.context import StepContext
from mtrain.runtime.program import Compute, Recording, backward_steps, drain, forward_steps
from mtrain.testing.memory import LiveTensorMemory


def test_live_tensor_memory_counts_what_autograd_keeps():
    x = torch.randn(256, 256, requires_grad=True)
    tensor = 256 * 256 * 4
    with LiveTensorMemory() as kept:
        y = torch.sigmoid(x * 2)  # sigmoid keeps its output for the backward
        del y
    assert kept.live_bytes() == 0  # nothing left once y's graph is gone
    with LiveTensorMemory() as kept:
        z = torch.sigmoid(x * 2).sum()
    assert kept.live_bytes() == tensor + 4  # sigmoid's saved output and the sum
    with LiveTensorMemory() as freed:
        z = torch.sigmoid(x * 2)
        z.untyped_storage().resize_(0)
    assert freed.live_bytes() == 0 and freed.peak_bytes == 2 * tensor
    del z


def moe_layer():
    cfg = load_config(["model.hidden_size=256", "model.num_routed_experts=16", "model.moe_topk=8",
                       "model.moe_ffn_hidden_size=128", "model.n_group=1", "model.topk_group=1"]).model
    torch.manual_seed(0)
    return MoELayer(cfg), torch.randn(1, 1024, 256)


def peak(fn) -> int:
    with LiveTensorMemory() as live:
        fn()
    return live.peak_bytes


def recorded_run(layer, x, release: bool):
    steps = [s if isinstance(s, Compute) else
             dataclasses.replace(s, release_sent=release and s.release_sent,
                                 release_received=release and s.release_received)
             for s in layer.program()]
    steps.append(Compute(lambda c, step: c.replace(hidden=layer.output(c)), "output"))
    rec = Recording(StepContext())
    out = drain(forward_steps(steps, MoECarry(normed=x.clone().requires_grad_(True)), rec)).hidden
    drain(backward_steps(rec, {"hidden": 2 * out.detach()}))


def test_recorded_moe_layer_stays_within_3_percent_of_plain_autograd():
    layer, x = moe_layer()
    plain = peak(lambda: layer(x.clone().requires_grad_(True), StepContext()).square().sum().backward())
    plain_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    recorded = peak(lambda: recorded_run(layer, x, release=True))
    for p, g in zip(layer.parameters(), plain_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    layer.zero_grad(set_to_none=True)
    keeping = peak(lambda: recorded_run(layer, x, release=False))
    assert recorded <= 1.03 * plain, (recorded, plain)
    # Without releasing the exchanged rows the recording holds a [tokens * top-k, hidden] tensor more.
    assert keeping - recorded >= 1024 * 8 * 256 * 4, (keeping, recorded)
