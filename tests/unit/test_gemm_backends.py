"""Choosing the grouped-GEMM backend (``model.grouped_gemm``); needs no triton."""
import logging
import sys

import pytest
import torch

from mtrain.model.moe import gemm_backends
from mtrain.model.moe.experts import GroupedExperts, grouped_linear
from mtrain.model.moe.gemm_backends import AutoGroupedGemm, TorchGroupedGemm, grouped_gemm_backend


@pytest.fixture(autouse=True)
def fresh_choice():
    grouped_gemm_backend.cache_clear()
    yield
    grouped_gemm_backend.cache_clear()


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="auto, torch, grouped_mm, triton"):
        GroupedExperts(2, 8, 8, 0.1, grouped_gemm="cutlass")


def test_triton_without_the_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    with pytest.raises(ImportError, match="pip install triton"):
        GroupedExperts(2, 8, 8, 0.1, grouped_gemm="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        GroupedExperts(2, 8, 8, 0.1, grouped_gemm="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only choice")
def test_auto_on_cpu_runs_torch_and_logs_once(caplog):
    with caplog.at_level(logging.INFO, logger=gemm_backends.__name__):
        backend = grouped_gemm_backend("auto")
        grouped_gemm_backend("auto")
    assert isinstance(backend, AutoGroupedGemm)
    assert backend._pick(torch.zeros(1)) is TorchGroupedGemm
    assert [r.getMessage() for r in caplog.records] == ["model.grouped_gemm=auto: torch (no CUDA)"]


def test_torch_backend_matches_dense_per_expert_products():
    counts = [3, 0, 5]
    torch.manual_seed(0)
    x = torch.randn(8, 4, requires_grad=True)
    weight = torch.randn(3, 6, 4, requires_grad=True)
    y = grouped_linear(x, weight, counts, "auto")
    # Row r belongs to expert experts[r]: a gather of full weights is the same product.
    experts = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y2 = torch.einsum("ri,roi->ro", x2, w2[experts])
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(weight.grad[1], torch.zeros(6, 4))


@pytest.mark.skipif(not gemm_backends.grouped_mm_available(), reason="this torch has no grouped_mm")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_mm_backend_matches_the_per_expert_loop_with_deferred_weight_grads(dtype, tol):
    from mtrain.runtime.context import StepContext

    counts = [5, 0, 17, 1, 0, 9]  # empty experts, uneven blocks
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 24).to(dtype)
    weight = torch.randn(6, 40, 24).to(dtype)
    results = {}
    for kind in ("torch", "grouped_mm"):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        step = StepContext()
        with step.bound():
            y = grouped_linear(xi, wi, counts, kind)
        with step.deferring_weight_grads() as sink:
            y.float().square().sum().backward()
        assert wi.grad is None and len(sink) == 1  # the weight gradient waits for its W
        sink.run()
        results[kind] = (y.detach().float(), xi.grad.float(), wi.grad.float())
    for ours, ref in zip(results["grouped_mm"], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    assert torch.equal(results["grouped_mm"][2][1], torch.zeros(40, 24))


def test_auto_prefers_grouped_mm_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gemm_backends, "grouped_mm_available", lambda: True)
    backend = grouped_gemm_backend("auto")
    assert backend._gpu is gemm_backends.GroupedMMGemm
    assert backend._pick(torch.zeros(1)) is TorchGroupedGemm  # CPU tensors keep the loop
