"""torch's grouped matmul backend on CUDA (bf16) against the per-expert
reference, through the experts, with and without deferred weight gradients.
Relative error of outputs and gradients below 1e-2 (one bf16 rounding, a
different summation order)."""
import pytest
import torch

from mtrain.model.moe import gemm_backends
from mtrain.model.moe.experts import GroupedExperts
from mtrain.runtime.context import StepContext

pytestmark = pytest.mark.gpu
# Empty experts, uneven blocks, one large block.
COUNTS = [0, 1, 130, 0, 64, 517, 3, 0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def run_experts(backend: str, defer: bool):
    torch.manual_seed(0)
    experts = GroupedExperts(len(COUNTS), hidden=256, ffn=384, init_std=0.05, grouped_gemm=backend)
    experts = experts.to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(sum(COUNTS), 256, device="cuda").to(torch.bfloat16).requires_grad_()
    step = StepContext()
    with step.bound():
        y = experts(x, COUNTS)
    if defer:
        with step.deferring_weight_grads() as sink:
            y.float().square().sum().backward()
        sink.run()
    else:
        y.float().square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in experts.parameters()]


@pytest.mark.skipif(not gemm_backends.grouped_mm_available(), reason="this torch has no grouped_mm")
@pytest.mark.parametrize("defer", [False, True], ids=["direct", "deferred_wgrad"])
def test_bf16_experts_grouped_mm_matches_torch(defer):
    for got, want in zip(run_experts("grouped_mm", defer), run_experts("torch", defer)):
        assert relative_error(got, want) < 1e-2
