"""The FP8 layers on a CUDA device with the reference GEMMs: the same numbers
as on CPU (fp32 throughout; another accumulation order inside each GEMM), so
their fp8 tensor handling (byte-wise padding, row selection, slicing) runs
on the device. Skipped without CUDA."""
import pytest
import torch

from mtrain.model.fp8 import dequantize_tiles, fp8_rows, quantize_tiles
from mtrain.model.fp8_linear import fp8_grouped_linear, fp8_linear, fp8_swiglu_linear
from mtrain.runtime.context import weights_fixed

pytestmark = pytest.mark.gpu


def _run(device, counts, k=256, n=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    x = torch.randn(rows, k, generator=g)
    w_gate, w_up = (torch.randn(len(counts), n, k, generator=g) * 0.05 for _ in range(2))
    w_down = torch.randn(len(counts), k, n, generator=g) * 0.05
    w_dense = torch.randn(200, k, generator=g) * 0.05
    dy, dz = torch.randn(rows, k, generator=g), torch.randn(rows, 200, generator=g)
    leaves = [t.to(device).requires_grad_() for t in (w_gate, w_up, w_down, w_dense)]
    data, scales = quantize_tiles(x.to(device))
    order = torch.randperm(rows, generator=g).to(device)
    data, scales = fp8_rows(data, order), scales.index_select(0, order)
    xin = dequantize_tiles(data, scales).requires_grad_()
    with weights_fixed():
        gate = fp8_grouped_linear(xin, leaves[0], counts, (data, scales))
        up = fp8_grouped_linear(xin, leaves[1], counts, (data, scales))
        y = fp8_swiglu_linear(gate, up, leaves[2], counts)
        z = fp8_linear(xin, leaves[3])
        ((y * dy.to(device)).sum() + (z * dz.to(device)).sum()).backward()
    return [t.detach().cpu() for t in (y, z, xin.grad, *(w.grad for w in leaves))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_layers_on_cuda_match_cpu():
    counts = [130, 0, 5, 61]
    for got, want in zip(_run("cuda", counts), _run("cpu", counts)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
