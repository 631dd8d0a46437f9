"""The compiled Triton grouped GEMM on CUDA against the torch reference.

bf16: the reference runs in fp32 on the same bf16 values and is rounded once;
tolerance rtol 1.6e-2 / atol 1e-2 (one bf16 rounding plus a different fp32
summation order). fp32 (TF32 off): rtol = atol = 1e-4. End to end through the
experts (bf16): relative error of outputs and gradients below 1e-2.
"""
import pytest
import torch

pytest.importorskip("triton")

from mtrain.kernels import grouped_gemm as kernels  # noqa: E402
from mtrain.model.moe.experts import GroupedExperts  # noqa: E402
from mtrain.model.moe.gemm_backends import TorchGroupedGemm  # noqa: E402

pytestmark = pytest.mark.gpu
BF16 = {"rtol": 1.6e-2, "atol": 1e-2}
# Empty experts, rows far from tile multiples, one expert spanning many tiles.
COUNTS = [0, 1, 130, 0, 64, 517, 3, 0]


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def make_inputs(dtype, k_in=200, n_out=300):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, experts = sum(COUNTS), len(COUNTS)
    x = torch.randn(rows, k_in, device="cuda", generator=gen).to(dtype)
    weight = torch.randn(experts, n_out, k_in, device="cuda", generator=gen).to(dtype)
    grad_out = torch.randn(rows, n_out, device="cuda", generator=gen).to(dtype)
    return x, weight, grad_out


def test_bf16_kernels_match_reference():
    x, weight, grad_out = make_inputs(torch.bfloat16)
    ref = TorchGroupedGemm
    xf, wf, gf = x.float(), weight.float(), grad_out.float()
    torch.testing.assert_close(kernels.grouped_matmul(x, weight.transpose(1, 2), COUNTS),
                               ref.forward(xf, wf, COUNTS).to(torch.bfloat16), **BF16)
    torch.testing.assert_close(kernels.grouped_matmul(grad_out, weight, COUNTS),
                               ref.grad_input(gf, wf, COUNTS).to(torch.bfloat16), **BF16)
    dw = kernels.grouped_weight_grad(grad_out, x, COUNTS)
    torch.testing.assert_close(dw, ref.grad_weight(gf, xf, COUNTS).to(torch.bfloat16), **BF16)
    assert torch.equal(dw[0], torch.zeros_like(dw[0]))


def test_fp32_kernels_match_reference(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x, weight, grad_out = make_inputs(torch.float32)
    ref = TorchGroupedGemm
    tight = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(kernels.grouped_matmul(x, weight.transpose(1, 2), COUNTS),
                               ref.forward(x, weight, COUNTS), **tight)
    torch.testing.assert_close(kernels.grouped_matmul(grad_out, weight, COUNTS),
                               ref.grad_input(grad_out, weight, COUNTS), **tight)
    torch.testing.assert_close(kernels.grouped_weight_grad(grad_out, x, COUNTS),
                               ref.grad_weight(grad_out, x, COUNTS), **tight)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_experts(backend: str):
    torch.manual_seed(0)
    experts = GroupedExperts(len(COUNTS), hidden=256, ffn=384, init_std=0.05, grouped_gemm=backend)
    experts = experts.to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(sum(COUNTS), 256, device="cuda").to(torch.bfloat16).requires_grad_()
    y = experts(x, COUNTS)
    y.float().square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in experts.parameters()]


def test_bf16_experts_end_to_end_triton_matches_torch():
    for got, want in zip(run_experts("triton"), run_experts("torch")):
        assert relative_error(got, want) < 1e-2
