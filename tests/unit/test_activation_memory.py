"""Activation memory of the step-by-step runtime against plain autograd,
counted exactly as live tensor bytes (mtrain.testing.memory.LiveTensorMemory)."""
import torch

from mtrain.config.loading import load_config
from mtrain.model.moe.layer import MoECarry, MoELayer
from mtrain.runtime.context import StepContext
from mtrain.runtime.program import Recording, backward_steps, drain, forward_steps, keeping_exchanged
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
    steps = layer.standalone_program()
    rec = Recording(StepContext())
    carry = MoECarry(normed=x.clone().requires_grad_(True))
    # Like the plain run, keep no reference to the output or its gradient here:
    # what the backward needs of them, the recording holds.
    drain(backward_steps(rec, {"hidden": 2 * drain(forward_steps(steps if release else keeping_exchanged(steps),
                                                                 carry, rec)).hidden.detach()}))


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
    # Without releasing the exchanged tensors the recording holds two [tokens, hidden] more:
    # the received tokens (with their gates) and the combined rows.
    assert keeping - recorded >= 2 * 1024 * 256 * 4, (keeping, recorded)


def test_the_plans_activation_estimate_is_within_15_percent_of_the_measured_forward():
    """The activations a micro-batch's forward keeps for its backward (live
    tensor bytes at the end of the forward, one rank, fp32) against
    mtrain-plan's per-micro-batch activation estimate, for tiny and small."""
    from mtrain.planner.plan import make_plan
    from mtrain.config.loading import load_config
    from mtrain.model.model import ModelChunk, initialize
    from mtrain.runtime.runner import ChunkRunner

    for name in ("tiny", "small"):
        cfg = load_config([f"model={name}", "parallel=single", "cluster.gpus_per_node=1", "train.dtype=fp32"])
        m = cfg.model
        model = ModelChunk(m, list(range(m.num_layers)))
        initialize(model, 0, m.init_std)
        ids = torch.randint(m.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1),
                            generator=torch.Generator().manual_seed(0))
        runner = ChunkRunner(model)
        with LiveTensorMemory() as live:
            runner.forward(0, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, step=StepContext())
            measured = live.live_bytes()
        runner.backward(0, torch.ones(()))
        plan = make_plan(cfg, 1)
        assert plan["memory"][0]["peak_inflight_microbatches"] == 1
        estimate = plan["memory"][0]["activations"]
        assert abs(measured - estimate) <= 0.15 * measured, (name, measured, estimate)
