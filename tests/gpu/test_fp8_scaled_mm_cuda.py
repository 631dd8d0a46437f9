"""torch's blockwise-scaled FP8 GEMM (train.fp8_backend=scaled_mm, sm_90)
against the FP8 reference on the same quantized operands, in the three forms
the linears use (Fprop: tiles x blocks, Dgrad: tiles x transposed blocks,
Wgrad: tiles x tiles), with a row count off the 16-row grid and K/128 = 3
(cuBLASLt's block scales pad K to 4 blocks); then an FP8 linear's output and
gradients through each. Relative errors below 1e-2: a bf16 output rounding
and another summation order within each 128 of K."""
import pytest
import torch

from mtrain.model import fp8
from mtrain.model.fp8_linear import fp8_linear
from mtrain.model.fp8_scaled_mm import scaled_mm_matmul, unavailable_reason

pytestmark = pytest.mark.gpu


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.fixture(autouse=True)
def needs_sm90():
    reason = unavailable_reason(torch.device("cuda"))
    if reason:
        pytest.skip(reason)


def test_three_gemm_forms_match_the_reference():
    torch.manual_seed(0)
    t, k, n = 200, 384, 256
    x, w, g = torch.randn(t, k), torch.randn(n, k) * 0.05, torch.randn(t, n)
    qx, sx = fp8.quantize_tiles(x)
    qw, sw = fp8.quantize_blocks(w)
    qg, sg = fp8.quantize_tiles(g)
    qgt, sgt = fp8.quantize_tiles(torch.nn.functional.pad(g, (0, 0, 0, 56)).t())
    qxt, sxt = fp8.quantize_tiles(torch.nn.functional.pad(x, (0, 0, 0, 56)).t())
    cases = {"fprop": (qx, sx, qw, sw), "dgrad": (qg, sg, qw.t(), sw.t()), "wgrad": (qgt, sgt, qxt, sxt)}
    for name, (a, sa, b, sb) in cases.items():
        want = fp8.fp8_matmul(a, sa, b, sb)
        got = scaled_mm_matmul(a.cuda(), sa.cuda(), b.cuda(), sb.cuda())
        assert relative_error(got, want) < 1e-2, name


def test_fp8_linear_through_scaled_mm_matches_the_reference():
    torch.manual_seed(1)
    x = torch.randn(300, 256, requires_grad=True)
    w = (torch.randn(384, 256) * 0.05).requires_grad_()
    fp8.use_fp8_backend("reference", torch.device("cpu"))
    y = fp8_linear(x, w)
    y.square().sum().backward()
    want = (y.detach(), x.grad.clone(), w.grad.clone())
    xc, wc = x.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
    fp8.use_fp8_backend("scaled_mm", torch.device("cuda"))
    try:
        yc = fp8_linear(xc, wc)
        yc.square().sum().backward()
    finally:
        fp8.use_fp8_backend("reference", torch.device("cpu"))
    for got, ref in zip((yc.detach(), xc.grad, wc.grad), want):
        assert relative_error(got, ref) < 2e-2
