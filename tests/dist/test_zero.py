"""ZeRO-1 traffic on gloo ranks: gradients reduce-scattered to their owners
and parameters all-gathered back give the all-reduce + replicated update's
results (to the summation order: fp32 rtol 1e-5, bf16 one rounding), the same
weights on every rank, and fewer bytes sent."""
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from mtrain.model.params import tag
from mtrain.parallel.groups import create_groups
from mtrain.parallel.layout import build_layout
from mtrain.pipeline.schedule_rules import placement
from mtrain.testing import run_distributed
from mtrain.train.grads import main_grad, reduce_gradients
from mtrain.train.optimizer import ZeroAdamW

TRAIN = OmegaConf.create({"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1})
# Many tensors of unequal sizes, as a model has: owners balance their bytes.
SHAPES = {**{f"w{i}": (16 + 3 * i, 8) for i in range(12)}, **{f"b{i}": (16 + 3 * i,) for i in range(12)},
          "experts": (2, 6, 4)}


def make_params(dtype, shapes=SHAPES):
    """Seeded parameters of ``shapes``; ``experts`` tagged as an expert tensor."""
    g = torch.Generator().manual_seed(0)
    params = {}
    for name, shape in shapes.items():
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        params[name] = tag(p, expert=True) if name == "experts" else p
    return params


def _worker(zero: bool, dtype):
    from mtrain.train.grads import attach_main_grads

    groups = create_groups(build_layout(4, ep=2), timeout_s=30)  # dp=4, ep=2, expert_dp=2
    params = make_params(dtype)
    attach_main_grads(params)
    opt = ZeroAdamW(params, groups, TRAIN, zero=zero)
    place = placement("1f1b", 1, 0, mtp=False)
    g = torch.Generator().manual_seed(10 + dist.get_rank())
    for _ in range(2):
        opt.zero_grad()
        for p in params.values():
            (p * torch.randn(p.shape, generator=g).to(dtype)).sum().backward()
        scatter = opt.reduce_scatter_grads if opt.zero else None
        sent = reduce_gradients(params, groups, place, scatter)
        owned = {n: main_grad(params[n]).clone() for n in opt.owned}
        gathered = opt.step(1e-2)
    return {"params": {n: p.detach().float().clone() for n, p in params.items()}, "owned": owned,
            "sent": sent, "gathered": gathered}


def test_reduce_scatter_and_all_gather_equal_the_replicated_update():
    for dtype in (torch.float32, torch.bfloat16):
        plain = run_distributed(_worker, 4, False, dtype, timeout=60)
        zero = run_distributed(_worker, 4, True, dtype, timeout=60)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
        for rank in range(4):
            for name, value in zero[rank]["params"].items():
                torch.testing.assert_close(value, plain[rank]["params"][name], **tol)
                # Every replica holds the same weights (experts: over expert_dp, ranks r and r+2).
                replica = rank % 2 if name == "experts" else 0
                assert torch.equal(value, zero[replica]["params"][name]), (rank, name)
            for name, grad in zero[rank]["owned"].items():  # the owners' summed gradients
                torch.testing.assert_close(grad, plain[rank]["owned"][name], rtol=1e-6, atol=1e-7)
        # The dp sums move each gradient about once (reduce-scatter), not twice (all-reduce).
        assert all(z["sent"] < 0.6 * p["sent"] for z, p in zip(zero, plain)), [(z["sent"], p["sent"]) for z, p in
                                                                                zip(zero, plain)]
