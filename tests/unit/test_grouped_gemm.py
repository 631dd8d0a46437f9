"""The Triton grouped GEMM, run by Triton's CPU interpreter, against the torch
reference. fp32 tolerance: rtol = atol = 1e-5 (only the summation order
differs); bf16: torch.testing's bf16 defaults (one rounding of the output)."""
import pytest
import torch

pytest.importorskip("triton")

from mtrain.kernels import grouped_gemm as kernels  # noqa: E402
from mtrain.model.moe.experts import GroupedExperts  # noqa: E402
from mtrain.model.moe.gemm_backends import TorchGroupedGemm  # noqa: E402
from mtrain.runtime.context import StepContext  # noqa: E402

FP32 = {"rtol": 1e-5, "atol": 1e-5}
# Tiles of 16 so that tiny shapes still span several row, column and K tiles.
SMALL = {"block_m": 16, "block_n": 16, "block_k": 16}
COUNTS = [
    [5, 0, 17, 1, 0, 16],  # empty experts, rows not a multiple of the tile, one exact tile
    [0, 0, 0],  # nothing routed at all
    [0, 37],  # leading empty expert, one expert spanning three tiles
]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    # The kernels read this when they run, so setting it per test is enough.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(counts, k_in=24, n_out=40, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows, experts = sum(counts), len(counts)
    x = torch.randn(rows, k_in, generator=gen).to(dtype)
    weight = torch.randn(experts, n_out, k_in, generator=gen).to(dtype)
    grad_out = torch.randn(rows, n_out, generator=gen).to(dtype)
    return x, weight, grad_out


@pytest.mark.parametrize("counts", COUNTS)
def test_forward_and_grads_match_reference_fp32(counts):
    x, weight, grad_out = make_inputs(counts)
    ref = TorchGroupedGemm
    torch.testing.assert_close(kernels.grouped_matmul(x, weight.transpose(1, 2), counts, **SMALL),
                               ref.forward(x, weight, counts), **FP32)
    torch.testing.assert_close(kernels.grouped_matmul(grad_out, weight, counts, **SMALL),
                               ref.grad_input(grad_out, weight, counts), **FP32)
    dw = kernels.grouped_weight_grad(grad_out, x, counts, **SMALL)
    torch.testing.assert_close(dw, ref.grad_weight(grad_out, x, counts), **FP32)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(dw[e], torch.zeros_like(dw[e]))


def test_bf16_matches_reference_on_same_inputs():
    counts = COUNTS[0]
    x, weight, grad_out = make_inputs(counts, dtype=torch.bfloat16, seed=1)
    ref = TorchGroupedGemm

    def rounded(t):  # reference in fp32 on the same bf16 values, rounded once
        return t.float().to(torch.bfloat16)

    y = kernels.grouped_matmul(x, weight.transpose(1, 2), counts, **SMALL)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, rounded(ref.forward(x.float(), weight.float(), counts)))
    torch.testing.assert_close(kernels.grouped_matmul(grad_out, weight, counts, **SMALL),
                               rounded(ref.grad_input(grad_out.float(), weight.float(), counts)))
    torch.testing.assert_close(kernels.grouped_weight_grad(grad_out, x, counts, **SMALL),
                               rounded(ref.grad_weight(grad_out.float(), x.float(), counts)))


def test_strided_inputs():
    counts = [7, 0, 20]
    x, weight, grad_out = make_inputs(counts)
    wide = torch.cat([x, torch.randn_like(x)], 1)
    x_view = wide[:, : x.shape[1]]  # rows are not contiguous in memory
    assert not x_view.is_contiguous()
    torch.testing.assert_close(kernels.grouped_matmul(x_view, weight.transpose(1, 2), counts, **SMALL),
                               TorchGroupedGemm.forward(x, weight, counts), **FP32)
    torch.testing.assert_close(kernels.grouped_weight_grad(grad_out, x_view, counts, **SMALL),
                               TorchGroupedGemm.grad_weight(grad_out, x, counts), **FP32)


def test_rejects_counts_that_do_not_partition_rows():
    x, weight, _ = make_inputs([3, 4])
    with pytest.raises(ValueError, match="partition"):
        kernels.grouped_matmul(x, weight.transpose(1, 2), [3, 3])


def run_experts(backend, counts, deferred):
    torch.manual_seed(0)
    experts = GroupedExperts(len(counts), hidden=24, ffn=40, init_std=0.2, grouped_gemm=backend)
    x = torch.randn(sum(counts), 24, requires_grad=True)
    step = StepContext()
    with step.bound():  # the forward captures the context its backward defers into
        y = experts(x, counts)
    if deferred:
        with step.deferring_weight_grads() as pending:
            y.square().sum().backward()
        assert all(p.grad is None for p in experts.parameters())
        pending.run()
    else:
        y.square().sum().backward()
    return y.detach(), x.grad, [p.grad for p in experts.parameters()]


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Count launches, so the comparison below cannot silently be torch vs torch."""
    calls = {"grouped_matmul": 0, "grouped_weight_grad": 0}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.mark.parametrize("deferred", [False, True], ids=["direct", "deferred_wgrad"])
def test_experts_end_to_end_triton_matches_torch(deferred, monkeypatch):
    counts = [9, 0, 21, 2]
    calls = count_kernel_calls(monkeypatch)
    y_t, gx_t, gw_t = run_experts("triton", counts, deferred)
    # gate, up, down: three forward products, three input grads, three weight grads.
    assert calls == {"grouped_matmul": 6, "grouped_weight_grad": 3}
    y_r, gx_r, gw_r = run_experts("torch", counts, deferred)
    assert calls == {"grouped_matmul": 6, "grouped_weight_grad": 3}
    torch.testing.assert_close(y_t, y_r, **FP32)
    torch.testing.assert_close(gx_t, gx_r, **FP32)
    for a, b in zip(gw_t, gw_r):
        torch.testing.assert_close(a, b, **FP32)
