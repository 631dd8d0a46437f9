"""``parallel.grad_reduce_dtype=bf16`` on 2 gloo ranks (dp=2, expert_dp=2):
the sums over replicas run on bf16 copies of the fp32 gradients, by all-reduce
and by ZeRO-1's reduce-scatter into owners, and send half the bytes.

With two ranks every element's sum is one addition, so the bf16 reduction is
exactly ``bf16(bf16(a) + bf16(b))``: the fp32 sum of the bf16-rounded per-rank
gradients, rounded once to bf16; the division by dp follows in fp32, as for
the fp32 reduction.
"""
import pytest
import torch
import torch.distributed as dist
from mtrain.parallel.groups import create_groups
from mtrain.parallel.layout import build_layout
from mtrain.pipeline.schedule_rules import placement
from mtrain.testing import run_distributed
from mtrain.train.grads import attach_main_grads, main_grad, reduce_gradients
from mtrain.train.optimizer import ZeroAdamW
from tests.dist.test_zero import TRAIN
from tests.dist.test_zero import make_params as zero_test_params

SHAPES = {**{f"w{i}": (16 + 3 * i, 8) for i in range(6)}, **{f"b{i}": (16 + 3 * i,) for i in range(6)},
          "experts": (2, 6, 4)}
U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits, half an ulp at 1


def make_params(dtype):
    return zero_test_params(dtype, SHAPES)


def _worker(zero: bool, dtype):
    groups = create_groups(build_layout(2), timeout_s=30)  # dp=2, ep=1, expert_dp=2
    params = make_params(dtype)
    attach_main_grads(params)
    opt = ZeroAdamW(params, groups, TRAIN, zero=zero)
    place = placement("1f1b", 1, 0, mtp=False)
    g = torch.Generator().manual_seed(10 + dist.get_rank())
    for _ in range(2):  # two micro-batches accumulated in fp32: not bf16 values any more
        for p in params.values():
            (p * torch.randn(p.shape, generator=g).to(dtype)).sum().backward()
    local = {n: main_grad(p).detach().clone() for n, p in params.items()}
    checked = sorted(opt.owned) if zero else sorted(params)  # ZeRO: only owners hold the sums
    out = {"local": local, "checked": checked, "sent": {}}
    for reduce_dtype in ("fp32", "bf16"):
        for n, p in params.items():
            main_grad(p).copy_(local[n])
        scatter = opt.reduce_scatter_grads if zero else None
        out["sent"][reduce_dtype] = reduce_gradients(params, groups, place, scatter, reduce_dtype)
        out[reduce_dtype] = {n: main_grad(params[n]).clone() for n in checked}
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16_params", "fp32_params"])
@pytest.mark.parametrize("zero", [False, True], ids=["all_reduce", "zero_reduce_scatter"])
def test_bf16_reduction_sums_bf16_rounded_gradients_and_halves_the_bytes(zero, dtype):
    ranks = run_distributed(_worker, 2, zero, dtype, timeout=60)
    a, b = ranks[0]["local"], ranks[1]["local"]
    assert all(g.dtype == torch.float32 for g in a.values())  # main gradients (bf16) or .grad (fp32)
    rounded_somewhere = False
    for rank, r in enumerate(ranks):
        for name in r["checked"]:
            a_bf, b_bf = a[name].bfloat16(), b[name].bfloat16()
            rounded_somewhere |= not torch.equal(a_bf.float(), a[name])
            fp32_sum_of_rounded = a_bf.float() + b_bf.float()
            # The reduction on bf16-cast values, by hand; then the division by dp=2 in fp32.
            by_hand = (a_bf + b_bf).float() / 2
            got = r["bf16"][name]
            assert got.dtype == torch.float32, name  # written back into the fp32 gradient
            assert torch.equal(got, by_hand), (rank, name)
            # ... which is the fp32 sum of the bf16-rounded gradients to one bf16 rounding.
            assert ((2 * got - fp32_sum_of_rounded).abs() <= U * fp32_sum_of_rounded.abs()).all(), (rank, name)
            # The fp32 reduction is untouched; bf16 differs from it by bf16 rounding only:
            # <= u|a| + u|b| (casts) + u(1+u)(|a|+|b|) (the sum), halved with the sum.
            exact = r["fp32"][name]
            assert torch.equal(exact, (a[name] + b[name]) / 2), (rank, name)
            bound = 2 * U * (1 + U) * (a[name].abs() + b[name].abs()) / 2
            assert ((got - exact).abs() <= bound).all(), (rank, name)
    assert rounded_somewhere
    assert any(not torch.equal(r["bf16"][n], r["fp32"][n]) for r in ranks for n in r["checked"])
    if zero:  # every parameter is checked on its owner
        assert sorted(set(ranks[0]["checked"]) | set(ranks[1]["checked"])) == sorted(SHAPES)
    for r in ranks:
        assert r["sent"]["fp32"] > 0 and r["sent"]["fp32"] == 2 * r["sent"]["bf16"], r["sent"]


def test_an_unknown_reduce_dtype_is_refused():
    params = make_params(torch.float32)
    with pytest.raises(ValueError, match="grad_reduce_dtype='fp16': choose one of fp32, bf16"):
        reduce_gradients(params, None, placement("1f1b", 1, 0, mtp=False), reduce_dtype="fp16")
