"""The FP8 reference (mtrain/model/fp8.py): quantization, the blockwise GEMM,
fp8_linear's three GEMMs, deferred weight gradients, and train.fp8's rules."""
import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.model.fp8 import (FP8_DTYPE, FP8_MAX, dequantize_blocks, dequantize_tiles, fp8_matmul, quantize_blocks,
                              quantize_tiles)
from mtrain.model.fp8_linear import fp8_linear
from mtrain.runtime.context import StepContext
from mtrain.train.preflight import config_errors

HALF_ULP = 2.0 ** -4  # E4M3: 3 mantissa bits, relative rounding error of a normal value
SUBNORMAL_STEP = 2.0 ** -9  # E4M3's subnormal spacing (in units of the scale)
# The tiny model at widths every FP8 GEMM accepts (multiples of 128; o_proj's input 2 x 64).
FP8_TINY = ("model.hidden_size=128", "model.q_lora_rank=128", "model.kv_lora_rank=128", "model.ffn_hidden_size=256",
            "model.moe_ffn_hidden_size=128", "model.num_heads=2", "model.qk_nope_head_dim=64",
            "model.qk_rope_head_dim=32", "model.v_head_dim=64")


def _bound(x: torch.Tensor, scales_full: torch.Tensor) -> torch.Tensor:
    """Per-element bound of |dequantize(quantize(x)) - x|: half an ulp relative,
    or half a subnormal step times the tile's scale, plus fp32 slack."""
    return HALF_ULP * x.abs() + 0.5 * SUBNORMAL_STEP * scales_full + 1e-6 * x.abs()


def _wide_range(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Magnitudes over ~8 decades, so tiles hold normals and subnormals alike.
    return torch.randn(shape, generator=g) * torch.exp(torch.empty(shape).uniform_(-9, 9, generator=g))


def test_tile_round_trip_is_within_e4m3s_bound():
    x = _wide_range((6, 512))
    q, s = quantize_tiles(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and s.shape == (6, 4) and s.dtype == torch.float32
    err = (dequantize_tiles(q, s) - x).abs()
    assert (err <= _bound(x, s.repeat_interleave(128, -1))).all()
    # Leading dimensions are kept.
    q3, s3 = quantize_tiles(x.reshape(2, 3, 512))
    assert s3.shape == (2, 3, 4) and torch.equal(s3.reshape(6, 4), s)


def test_block_round_trip_is_within_e4m3s_bound():
    w = _wide_range((256, 384), seed=1)
    q, s = quantize_blocks(w)
    assert q.dtype == FP8_DTYPE and s.shape == (2, 3)
    err = (dequantize_blocks(q, s) - w).abs()
    assert (err <= _bound(w, s.repeat_interleave(128, 0).repeat_interleave(128, 1))).all()


def test_scales_by_hand():
    x = torch.zeros(2, 256)
    x[0, 5], x[0, 200], x[1, 7] = -896.0, 44.8, 3.0
    q, s = quantize_tiles(x)
    # Row 0: tile 0 amax 896 -> 2; tile 1 amax 44.8 -> 0.1. Row 1: 3 / 448, then an all-zero tile -> 1.
    torch.testing.assert_close(s, torch.tensor([[2.0, 44.8 / 448], [3.0 / 448, 1.0]]))
    assert q[0, 5].float() == -448 and q[0, 200].float() == 448 and q[1, 7].float() == 448
    assert (q[1, 128:].float() == 0).all()
    w = torch.zeros(256, 128)
    w[3, 3], w[130, 0] = 0.5, -448.0
    qw, sw = quantize_blocks(w)
    torch.testing.assert_close(sw, torch.tensor([[0.5 / 448], [1.0]]))
    assert qw[3, 3].float() == 448 and qw[130, 0].float() == -448


def test_zero_tiles_quantize_to_zero_with_unit_scale():
    q, s = quantize_tiles(torch.zeros(3, 128))
    assert torch.equal(s, torch.ones(3, 1)) and (q.float() == 0).all()
    qw, sw = quantize_blocks(torch.zeros(128, 256))
    assert torch.equal(sw, torch.ones(1, 2)) and torch.equal(dequantize_blocks(qw, sw), torch.zeros(128, 256))


def test_widths_not_multiples_of_128_are_named():
    with pytest.raises(ValueError, match=r"activation of shape \[4, 100\].*not multiples of 128"):
        quantize_tiles(torch.ones(4, 100))
    with pytest.raises(ValueError, match=r"weight of shape \[130, 128\].*pad the tensor"):
        quantize_blocks(torch.ones(130, 128))
    with pytest.raises(ValueError, match=r"fp8_linear input of shape \[2, 3, 96\]"):
        fp8_linear(torch.ones(2, 3, 96), torch.ones(128, 96))


def _float64_product(a, sa, b, sb, a_blocks=False, b_blocks=False):
    def deq(q, s, blocks):
        return (dequantize_blocks(q, s) if blocks else dequantize_tiles(q, s)).double()
    return deq(a, sa, a_blocks) @ deq(b, sb, b_blocks).t()


def test_reference_gemm_matches_float64_of_the_dequantized_operands():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, 384, generator=g), torch.randn(256, 384, generator=g) * 0.02
    qa, sa = quantize_tiles(a)
    qb, sb = quantize_blocks(b)
    out = fp8_matmul(qa, sa, qb, sb)
    ref = _float64_product(qa, sa, qb, sb, b_blocks=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # Tiles on both sides (Wgrad's form), and a transposed block operand (Dgrad's form).
    qc, sc = quantize_tiles(torch.randn(256, 384, generator=g))
    torch.testing.assert_close(fp8_matmul(qa, sa, qc, sc).double(), _float64_product(qa, sa, qc, sc),
                               rtol=1e-5, atol=1e-5)
    qd, sd = quantize_tiles(torch.randn(64, 256, generator=g))
    torch.testing.assert_close(fp8_matmul(qd, sd, qb.t(), sb.t()).double(),
                               dequantize_tiles(qd, sd).double() @ dequantize_blocks(qb, sb).double(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fit neither"):
        fp8_matmul(qa, sa[:5], qb, sb)


def _expected(x, w, dy):
    """fp8_linear's outputs from the dequantized operands, in float64, per the
    documented orientation: Fprop x tiles along K / W blocks; Dgrad dy tiles
    along N / W blocks; Wgrad dy and x tiles along the (padded) tokens."""
    n, k = w.shape
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    t = x2.shape[0]
    pad = -t % 128
    wq = dequantize_blocks(*quantize_blocks(torch.nn.functional.pad(w, (0, 0, 0, -n % 128)))).double()[:n]
    xq = dequantize_tiles(*quantize_tiles(x2)).double()
    dyq = dequantize_tiles(*quantize_tiles(torch.nn.functional.pad(dy2, (0, -n % 128)))).double()[:, :n]
    dyt = dequantize_tiles(*quantize_tiles(torch.nn.functional.pad(dy2.t(), (0, pad)))).double()[:, :t]
    xt = dequantize_tiles(*quantize_tiles(torch.nn.functional.pad(x2.t(), (0, pad)))).double()[:, :t]
    return xq @ wq.t(), dyq @ wq, dyt @ xt.t()


@pytest.mark.parametrize("tokens, n", [(2 * 128, 256), (2 * 75, 192)])  # 150 tokens, 192 outputs: ragged edges
def test_fp8_linear_forward_and_gradients(tokens, n):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, tokens // 2, 256, generator=g).requires_grad_()
    w = (torch.randn(n, 256, generator=g) * 0.05).requires_grad_()
    b = torch.randn(n, generator=g).requires_grad_()
    dy = torch.randn(2, tokens // 2, n, generator=g)
    y = fp8_linear(x, w, b)
    y.backward(dy)
    fwd, dx, dw = _expected(x.detach(), w.detach(), dy)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.detach().double(), fwd.reshape(y.shape) + b.detach().double(), **tol)
    torch.testing.assert_close(x.grad.double(), dx.reshape(x.shape), **tol)
    torch.testing.assert_close(w.grad.double(), dw, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b.grad, dy.reshape(-1, n).sum(0))
    # And close to the unquantized linear: E4M3's error, averaged over the sums.
    exact = x.detach().double().reshape(-1, 256) @ w.detach().double().t()
    rel = (fwd - exact).norm() / exact.norm()
    assert rel < 0.05, rel


def test_deferred_weight_gradient_is_the_same():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(128, 256, generator=g).requires_grad_()
    w0 = torch.randn(128, 256, generator=g) * 0.05
    dy = torch.randn(128, 128, generator=g)
    w_now = w0.clone().requires_grad_()
    fp8_linear(x, w_now).backward(dy)

    w_later = w0.clone().requires_grad_()
    step = StepContext()
    x2 = x.detach().clone().requires_grad_()
    with step.bound():
        y = fp8_linear(x2, w_later)
    with step.deferring_weight_grads() as sink:
        y.backward(dy)
    assert w_later.grad is None and len(sink) == 1
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=0)
    sink.run()
    torch.testing.assert_close(w_later.grad, w_now.grad, rtol=0, atol=0)


def test_bf16_inputs_and_master_weights():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 128, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(128, 128, generator=g) * 0.05).bfloat16().requires_grad_()
    y = fp8_linear(x, w)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16


def test_e4m3_constants():
    assert FP8_MAX == 448.0 and torch.finfo(FP8_DTYPE).smallest_normal == 2.0 ** -6


def test_config_fp8_widths_are_named_with_the_fix():
    errors = config_errors(load_config(["train.fp8=blockwise"]))  # tiny: 64-wide
    assert any("train.fp8=blockwise: model.hidden_size=64 is not a multiple of 128" in e
               and "set model.hidden_size so it is, or train.fp8=none" in e for e in errors), errors
    assert any("model.kv_lora_rank=32" in e for e in errors)
    assert any("model.num_shared_experts x model.moe_ffn_hidden_size / parallel.tp (1 x 32 / 1)=32" in e
               for e in errors)  # the shared experts
    assert any("model.moe_ffn_hidden_size / parallel.expert_tp (a routed expert's down projection input: 32 / 1)=32"
               in e for e in errors)
    assert any("output projection's input" in e for e in errors)
    assert config_errors(load_config(["train.fp8=none"])) == []
    from mtrain.config.validate import fp8_width_errors

    # V3's widths fit, at tp=2 too (kv_a's 576 rows: a ragged edge)...
    assert fp8_width_errors(load_config(["model=deepseek_v3"]).model, 2) == []
    assert config_errors(load_config(["train.fp8=blockwise", "model=deepseek_v3", "parallel.tp=2"])) == []
    # With tp > 1 a column-parallel shard's rows must be block-aligned too (docs/fp8.md, "Tensor
    # parallelism"): FP8_TINY's q_b has 2 heads of 96 rows, 96 on each of 2 ranks.
    tp2 = config_errors(load_config(["train.fp8=blockwise", *FP8_TINY, "parallel.tp=2"]))
    tail = " is not a multiple of 128 (FP8 GEMMs reduce in 128-wide tiles): set "
    assert sorted(tp2) == sorted([
        "train.fp8=blockwise: model.num_heads x (model.qk_nope_head_dim + model.qk_rope_head_dim) / parallel.tp "
        "(the query up-projection's rows on one rank: 2 x 96 / 2)=96" + tail + "model.qk_nope_head_dim, "
        "model.qk_rope_head_dim, model.num_heads or parallel.tp so it is, or train.fp8=none",
        "train.fp8=blockwise: model.num_heads x model.v_head_dim / parallel.tp (the output projection's input: "
        "2 x 64 / 2)=64" + tail + "model.v_head_dim, model.num_heads or parallel.tp so it is, or train.fp8=none",
        "train.fp8=blockwise: model.num_shared_experts x model.moe_ffn_hidden_size / parallel.tp (1 x 128 / 2)=64"
        + tail + "model.moe_ffn_hidden_size or parallel.tp so it is, or train.fp8=none"]), tp2
    assert config_errors(load_config(["train.fp8=blockwise", *FP8_TINY])) == []


def test_fp8_backend_choice_names_the_field_and_the_fix():
    from mtrain.model.fp8 import use_fp8_backend

    use_fp8_backend("reference", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"train.fp8_backend=scaled_mm cannot run: it runs on CUDA.*"
                                         r"train.fp8_backend=reference"):
        use_fp8_backend("scaled_mm", torch.device("cpu"))
    with pytest.raises(ValueError, match="choose one of reference, scaled_mm"):
        use_fp8_backend("te", torch.device("cpu"))
