"""The whole model on one rank: program paths agree, MTP targets, deferred W."""
import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.model.model import ModelChunk, initialize
from mtrain.model.moe.deepep import config_errors as deepep_config_errors
from mtrain.model.moe.dispatch import Dispatcher, DispatchPlan
from mtrain.runtime.context import StepContext
from mtrain.runtime.runner import ChunkRunner


def tiny(*overrides):
    cfg = load_config(list(overrides)).model
    model = ModelChunk(cfg, list(range(cfg.num_layers)))
    initialize(model, 3, cfg.init_std)
    return cfg, model


def batch(cfg, seed=0, b=2, s=16):
    ids = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_stepwise_program_equals_plain_forward_backward():
    cfg, model = tiny()
    data = batch(cfg)
    out = model(data)
    out.loss.backward()
    plain = grads(model)
    model.zero_grad()
    runner = ChunkRunner(model)
    loss = runner.forward(0, data)
    assert torch.equal(loss, out.loss.detach())
    runner.backward(0, torch.ones(()))
    stepwise = grads(model)
    assert plain.keys() == stepwise.keys()
    for name in plain:
        assert torch.equal(plain[name], stepwise[name]), name


def test_deferred_weight_grads_equal_immediate():
    cfg, model = tiny()
    data = batch(cfg)
    model(data).loss.backward()
    immediate = grads(model)
    model.zero_grad()
    step = StepContext()
    out = model(data, step=step)
    with step.deferring_weight_grads() as pending:
        out.loss.backward()
    assert len(pending) > 0
    assert model.layers["1"].mlp.experts.gate.grad is None  # deferred, not yet computed
    pending.run()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, immediate[name], rtol=0, atol=0, msg=name)


def test_every_parameter_gets_a_gradient():
    cfg, model = tiny()
    model(batch(cfg)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_same_seed_same_weights_any_construction():
    cfg, a = tiny()
    _, b = tiny()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_mtp_predicts_the_token_k_ahead():
    """Memorise one sequence; the MTP loss is ~0 only against targets shifted by k."""
    torch.manual_seed(0)
    cfg, model = tiny("model.mtp_depth=2", "model.mtp_loss_weight=1.0", "model.aux_loss_alpha=0")
    data = batch(cfg, b=1, s=12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        model(data).loss.backward()
        opt.step()
    out = model(data)
    assert out.lm_loss.item() < 0.05 and out.mtp_loss.item() < 0.05
    # Feed labels shifted by one more: an MTP that used the wrong offset would fit these.
    wrong = {"input_ids": data["input_ids"], "labels": torch.roll(data["labels"], -1, dims=1)}
    assert model(wrong).mtp_loss.item() > 1.0


def test_local_dispatch_round_trip_weights_and_order():
    d = Dispatcher(num_experts=4)
    idx = torch.tensor([[2, 0], [1, 2], [3, 0]])
    plan = d.plan(idx)
    assert plan.tokens_per_expert == [2, 1, 2, 1]
    x = torch.arange(3.0).unsqueeze(1)
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 4.0]])
    rows, gates = d.expand(d.pack(x, w, plan), plan)
    # Rows grouped by expert: expert 0 gets tokens 0, 2; expert 1 token 1; expert 2 tokens 0, 1; expert 3 token 2.
    assert rows.flatten().tolist() == [0, 2, 1, 0, 1, 2]
    assert gates.flatten().tolist() == [0.25, 4.0, 1.0, 0.5, 2.0, 3.0]
    y = d.unpack(d.reduce(rows * 10, gates, plan), plan)
    assert y.flatten().tolist() == [0 * 7.5, 10 * 3.0, 20 * 7.0]


def test_received_tokens_expand_to_their_own_slots_expert_major():
    """What DeepEP hands a receiver (and the alltoall plan builds): per received
    token, the local expert of each slot, -1 where another rank serves it."""
    plan = DispatchPlan(topk=2, num_tokens=0, dispatch_op=None, combine_op=None)
    ids = torch.tensor([[1, -1], [0, 2], [-1, 1], [0, -1]])
    plan.expand_received(ids, num_local=3, tokens_per_expert=[2, 2, 1])
    assert plan.row_token.tolist() == [1, 3, 0, 2, 1]  # expert 0: tokens 1, 3; expert 1: 0, 2; expert 2: 1
    assert plan.row_slot.tolist() == [2, 6, 0, 5, 3]
    received = torch.tensor([[10.0, 0.1, 0.9], [20.0, 0.2, 0.8], [30.0, 0.3, 0.7], [40.0, 0.4, 0.6]])
    rows, gates = Dispatcher.expand(received, plan)
    assert rows.flatten().tolist() == [20.0, 40.0, 10.0, 30.0, 20.0]
    assert gates.flatten().tolist() == pytest.approx([0.2, 0.4, 0.1, 0.7, 0.8])


def test_deepep_refuses_what_it_cannot_do():
    assert deepep_config_errors(8, "bf16") == []
    errors = deepep_config_errors(1, "fp32") + deepep_config_errors(6, "bf16")
    assert len(errors) == 3
    assert "parallel.ep > 1" in errors[0] and "train.dtype=fp32" in errors[1] and "not 6" in errors[2]


def test_parameter_count_formula_matches_the_module():
    from mtrain.model.stats import param_counts

    for overrides in ([], ["model.q_lora_rank=0", "model.mtp_depth=2", "model.num_shared_experts=2"]):
        cfg, model = tiny(*overrides)
        counts = param_counts(cfg)
        assert counts["total"] + counts["mtp"] == sum(p.numel() for p in model.parameters())


def test_deferred_weight_grads_build_no_graph():
    cfg, model = tiny()
    step = StepContext()
    out = model(batch(cfg), step=step)
    with step.deferring_weight_grads() as pending:
        out.loss.backward()
    pending.run()
    assert not any(p.grad.requires_grad for p in model.parameters())


def test_recompute_modes_give_identical_results():
    results = {}
    for mode in ("none", "selective", "full"):
        cfg, model = tiny(f"model.recompute={mode}")
        out = model(batch(cfg))
        out.loss.backward()
        results[mode] = (out.loss.detach(), grads(model))
    for mode in ("selective", "full"):
        assert torch.equal(results[mode][0], results["none"][0]), mode
        for name, g in results["none"][1].items():
            torch.testing.assert_close(results[mode][1][name], g, rtol=0, atol=0, msg=f"{mode} {name}")


def test_deepep_dispatcher_absent_fails_naming_the_package():
    import pytest

    from mtrain.model.moe.deepep import available
    from mtrain.model.moe.dispatch import make_dispatcher

    if available():
        pytest.skip("deep_ep is installed here")
    with pytest.raises(ImportError, match="deep_ep"):
        make_dispatcher("deepep", num_experts=8)
    # auto is the torch.distributed path (local for ep=1).
    assert make_dispatcher("auto", num_experts=8).name == "local"


def _auto_dispatcher_over_the_world():
    import torch.distributed as dist

    from mtrain.model.moe.dispatch import make_dispatcher

    return make_dispatcher("auto", num_experts=8, ep_group=dist.group.WORLD).name


def test_auto_dispatcher_never_picks_deepep_even_where_it_would_run(monkeypatch):
    import sys
    import types

    from mtrain.model.moe.dispatch import make_dispatcher
    from mtrain.testing import run_distributed

    class Buffer:  # any use of it means deepep was picked
        def __init__(self, *args, **kwargs):
            raise AssertionError("auto built a DeepEP buffer")

        set_num_sms = __init__

    monkeypatch.setitem(sys.modules, "deep_ep", types.SimpleNamespace(Buffer=Buffer))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make_dispatcher("auto", num_experts=8).name == "local"
    # Forked ranks inherit the stand-in module and the patched CUDA check.
    assert run_distributed(_auto_dispatcher_over_the_world, 2, timeout=60) == ["alltoall", "alltoall"]


def test_moe_layer_equals_the_per_expert_row_formula():
    """y[t] = shared(x[t]) + sum over slots s of gate[t, s] * expert_{id[t, s]}(x[t]), with
    gradients, at fp32: the token-level dispatch changes where the sum happens, not what it is."""
    import torch.nn.functional as F

    from mtrain.model.moe.layer import MoELayer

    cfg = load_config(["model.aux_loss_alpha=0"]).model
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    y = layer(x)

    x_ref = x.detach().clone().requires_grad_(True)
    flat = x_ref.reshape(-1, cfg.hidden_size)
    routing = layer.router(flat)
    e = layer.experts
    per_row = []
    for t in range(flat.shape[0]):
        out = 0
        for s in range(cfg.moe_topk):
            i = int(routing.topk_idx[t, s])
            h = F.silu(flat[t] @ e.gate[i].t()) * (flat[t] @ e.up[i].t())
            out = out + routing.topk_weights[t, s] * (h @ e.down[i].t())
        per_row.append(out)
    ref = torch.stack(per_row).view_as(x_ref) + layer.shared(x_ref)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), [x] + list(layer.parameters()))
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x_ref] + list(layer.parameters()), allow_unused=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r if r is not None else torch.zeros_like(g), rtol=1e-4, atol=1e-6)
