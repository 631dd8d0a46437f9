"""model.compile: the compiled regions give eager's losses and gradients,
with no graph break (fullgraph) and no recompilation when the expert counts or
the number of rows routed to this rank's experts change."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from mtrain.config.loading import load_config
from mtrain.model.model import ModelChunk
from mtrain.model.moe.experts import GroupedExperts

pytestmark = pytest.mark.slow  # compiling takes a while on CPU


def train_steps(compile_: bool, steps: int = 3):
    cfg = load_config([f"model.compile={str(compile_).lower()}"]).model
    torch.manual_seed(0)
    model = ModelChunk(cfg, list(range(cfg.num_layers)))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(1)
    losses, grads, loads = [], [], []
    for step in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)
        # After the first step every region is compiled: any recompilation is an error.
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            out = model({"input_ids": ids, "labels": ids})
            out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        loads.append(torch.stack([moe.router.load.clone() for moe in model.moe_layers()]))
        for moe in model.moe_layers():
            moe.router.load.zero_()
        opt.step()
        opt.zero_grad()
    return losses, grads, loads


def test_compiled_model_matches_eager_with_no_graph_break_and_no_recompile():
    torch._dynamo.reset()
    counters.clear()
    eager = train_steps(False)
    assert not counters["stats"], "eager mode compiled something"
    compiled = train_steps(True)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] > 0
    for step, (le, lc) in enumerate(zip(eager[0], compiled[0])):
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6, msg=f"loss of step {step}")
    for step, (ge, gc) in enumerate(zip(eager[1], compiled[1])):
        assert ge.keys() == gc.keys()
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-6, msg=f"{name}, step {step}")
    # The routing did change between steps: the counts are not what kept the graphs stable.
    loads = compiled[2]
    assert not torch.equal(loads[0], loads[1]) or not torch.equal(loads[1], loads[2])


def test_expert_rows_changing_do_not_recompile():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    experts = GroupedExperts(3, hidden=16, ffn=24, init_std=0.1, grouped_gemm="torch", compile=True)
    reference = GroupedExperts(3, hidden=16, ffn=24, init_std=0.1, grouped_gemm="torch")
    reference.load_state_dict(experts.state_dict())
    for i, counts in enumerate([[5, 0, 7], [1, 9, 3], [0, 0, 30], [4, 4, 4]]):
        x = torch.randn(sum(counts), 16, requires_grad=True)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = experts(x, counts)
        out.square().sum().backward()
        grad = x.grad
        x.grad = None
        torch.testing.assert_close(out, reference(x, counts), rtol=1e-5, atol=1e-6)
        reference(x, counts).square().sum().backward()
        torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
