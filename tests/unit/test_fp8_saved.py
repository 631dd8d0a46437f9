"""What the FP8 layers keep for the backward (mtrain/model/fp8_linear.py,
docs/fp8.md): Wgrad's operand quantized along the tokens instead of the
input, one copy for layers reading one tensor, the SwiGLU's inputs as FP8
tiles with its output recomputed, and one FP8 copy of each weight per step.
Each against the numbers computed by hand from the reference GEMMs."""
import torch
import torch.nn.functional as F

from mtrain.model.activations import swiglu
from mtrain.model.fp8 import (dequantize_tiles, dgrad, fp8_matmul, pad_rows, quantize_blocks, quantize_columns,
                              quantize_tiles)
from mtrain.model.fp8_linear import fp8_grouped_linear, fp8_linear, fp8_swiglu_linear
from mtrain.runtime.context import fixed_weights_cache, weights_fixed

FP8_BYTES = 1 + 4 / 128  # per element: E4M3 data and a fp32 scale per 128


class Saved:
    """The tensors autograd keeps, each storage counted once."""

    def __init__(self):
        self.tensors = []

    def pack(self, t):
        self.tensors.append(t)
        return t

    def bytes(self, exclude=()):
        seen = {p.untyped_storage().data_ptr() for p in exclude}
        total = 0
        for t in self.tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def hand_wgrad(dy, x):
    """Wgrad as the reference defines it: both operands quantized along T from the high-precision tensors."""
    qg, sg = quantize_tiles(pad_rows(dy).t())
    qx, sx = quantize_tiles(pad_rows(x).t())
    return fp8_matmul(qg, sg, qx, sx)


def weight_block_bytes(n, k):
    np_ = -(-n // 128) * 128
    return np_ * k + (np_ // 128) * (k // 128) * 4


def column_bytes(t, k):
    return k * t + k * -(-t // 128) * 4


def test_linear_keeps_wgrad_columns_not_its_input():
    torch.manual_seed(0)
    t, k, n = 200, 256, 192
    x = torch.randn(t, k, requires_grad=True)
    w = (torch.randn(n, k) * 0.05).requires_grad_()
    dy = torch.randn(t, n)
    with Saved() as saved:
        y = fp8_linear(x, w)
    y.backward(dy)
    assert saved.bytes(exclude=[x, w]) == weight_block_bytes(n, k) + column_bytes(t, k)
    assert not any(s is x for s in saved.tensors)
    assert torch.equal(w.grad, hand_wgrad(dy, x.detach()))
    assert torch.equal(y, fp8_matmul(*quantize_tiles(x.detach()), *quantize_blocks(pad_rows(w.detach())))[:, :n])


def test_layers_reading_one_tensor_keep_one_copy():
    torch.manual_seed(1)
    x = torch.randn(3, 50, 256, requires_grad=True)
    w1, w2 = (torch.randn(128, 256) * 0.05).requires_grad_(), (torch.randn(320, 256) * 0.05).requires_grad_()
    with Saved() as saved:
        y = fp8_linear(x, w1).sum() + fp8_linear(x, w2).sum()
    assert saved.bytes(exclude=[x, w1, w2]) == (weight_block_bytes(128, 256) + weight_block_bytes(320, 256)
                                                + column_bytes(150, 256))
    y.backward()
    ones = torch.ones(150, 128)
    assert torch.equal(w1.grad, hand_wgrad(ones, x.detach().reshape(150, 256)))
    # Changed in place: the second reader quantizes it again.
    x2 = torch.randn(40, 256)
    first = fp8_linear(x2, w1)
    x2.mul_(2)
    w1.grad = None
    fp8_linear(x2, w1).backward(torch.ones(40, 128))
    assert torch.equal(w1.grad, hand_wgrad(torch.ones(40, 128), x2))
    assert first.shape == (40, 128)


def test_experts_keep_columns_per_expert_even_from_dispatched_tiles():
    """Rows that arrived as FP8 tiles: Fprop uses the tiles, the backward keeps
    only the columns of their values; the bits equal quantizing the rows anew."""
    torch.manual_seed(2)
    counts, k, n = [130, 0, 5, 61], 256, 128
    data, scales = quantize_tiles(torch.randn(sum(counts), k))
    w = (torch.randn(len(counts), n, k) * 0.05).requires_grad_()
    dy = torch.randn(sum(counts), n)

    def run(tiles):
        rows = dequantize_tiles(data, scales).requires_grad_()
        w.grad = None
        with Saved() as saved:
            y = fp8_grouped_linear(rows, w, counts, tiles)
        y.backward(dy)
        return y.detach(), rows.grad, w.grad.clone(), saved.bytes(exclude=[rows, w])

    plain, from_tiles = run(None), run((data, scales))
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], from_tiles[:3]))
    expected = len(counts) * weight_block_bytes(n, k) + sum(column_bytes(c, k) for c in counts if c)
    assert plain[3] == from_tiles[3] == expected
    rows = dequantize_tiles(data, scales)
    start = 0
    for e, c in enumerate(counts):
        want = hand_wgrad(dy[start:start + c], rows[start:start + c]) if c else torch.zeros(n, k)
        assert torch.equal(plain[2][e], want), e
        start += c


def test_swiglu_linear_recomputes_from_fp8_inputs():
    torch.manual_seed(3)
    t, k, n = 150, 256, 192
    gate = torch.randn(t, k, requires_grad=True)
    up = torch.randn(t, k, requires_grad=True)
    w = (torch.randn(n, k) * 0.05).requires_grad_()
    dy = torch.randn(t, n)
    with Saved() as saved:
        y = fp8_swiglu_linear(gate, up, w)
    y.backward(dy)
    assert saved.bytes(exclude=[gate, up, w]) == weight_block_bytes(n, k) + 2 * (t * k + t * k // 128 * 4)
    # Forward: exactly the FP8 linear of the SwiGLU.
    assert torch.equal(y, fp8_linear(swiglu(gate, up).detach(), w.detach()))
    # Backward: the SwiGLU at the FP8 inputs' values.
    gq = dequantize_tiles(*quantize_tiles(gate.detach())).requires_grad_()
    uq = dequantize_tiles(*quantize_tiles(up.detach())).requires_grad_()
    h = swiglu(gq, uq)
    qw, sw = quantize_blocks(pad_rows(w.detach()))
    h.backward(dgrad(dy, qw, sw))
    assert torch.equal(gate.grad, gq.grad) and torch.equal(up.grad, uq.grad)
    assert torch.equal(w.grad, hand_wgrad(dy, h.detach()))


def test_grouped_swiglu_linear_is_the_plain_one_per_expert():
    torch.manual_seed(4)
    counts, k, n = [7, 0, 140], 128, 256
    gate = torch.randn(sum(counts), k, requires_grad=True)
    up = torch.randn(sum(counts), k, requires_grad=True)
    w = (torch.randn(len(counts), n, k) * 0.05).requires_grad_()
    dy = torch.randn(sum(counts), n)
    y = fp8_swiglu_linear(gate, up, w, counts)
    y.backward(dy)
    start = 0
    for e, c in enumerate(counts):
        ge, ue = (t.detach()[start:start + c].requires_grad_() for t in (gate, up))
        we = w.detach()[e].clone().requires_grad_()
        ye = fp8_swiglu_linear(ge, ue, we)
        ye.backward(dy[start:start + c])
        assert torch.equal(y[start:start + c], ye)
        assert torch.equal(gate.grad[start:start + c], ge.grad) and torch.equal(up.grad[start:start + c], ue.grad)
        assert torch.equal(w.grad[e], we.grad if c else torch.zeros(n, k))
        start += c


def test_one_fp8_copy_of_each_weight_while_weights_are_fixed():
    torch.manual_seed(5)
    w = (torch.randn(256, 128) * 0.05).requires_grad_()
    xs = [torch.randn(64, 128) for _ in range(3)]

    def weight_copies(scope):
        with scope, Saved() as saved:
            outs = [fp8_linear(x, w) for x in xs]
        fp8 = {t.untyped_storage().data_ptr() for t in saved.tensors if t.dtype == torch.float8_e4m3fn
               and t.shape == (1, 256, 128)}
        return len(fp8), outs

    import contextlib
    shared, outs_shared = weight_copies(weights_fixed())
    separate, outs_separate = weight_copies(contextlib.nullcontext())
    assert (shared, separate) == (1, 3)
    assert all(torch.equal(a, b) for a, b in zip(outs_shared, outs_separate))
    assert fixed_weights_cache() is None
    # A new block sees weights changed in between (as by an optimizer step, even through .data).
    w.data.mul_(-1)
    with weights_fixed():
        assert torch.equal(fp8_linear(xs[0], w), -outs_shared[0])


def test_deferred_weight_grad_of_swiglu_linear_matches_immediate():
    from mtrain.runtime.context import StepContext
    torch.manual_seed(6)
    gate, up = torch.randn(64, 128, requires_grad=True), torch.randn(64, 128, requires_grad=True)
    w = (torch.randn(128, 128) * 0.05).requires_grad_()
    fp8_swiglu_linear(gate, up, w).sum().backward()
    now = w.grad.clone()
    w.grad = None
    step = StepContext()
    with step.bound():
        y = fp8_swiglu_linear(gate, up, w)
    with step.deferring_weight_grads() as sink:
        y.sum().backward()
    assert w.grad is None and len(sink) == 1
    sink.run()
    assert torch.equal(w.grad, now)


def test_columns_drop_the_token_padding():
    x = torch.randn(130, 128)
    data, scales = quantize_columns(x)
    assert data.shape == (128, 130) and scales.shape == (128, 2) and data.is_contiguous()
    full, full_scales = quantize_tiles(F.pad(x, (0, 0, 0, 126)).t())
    assert torch.equal(data.float(), full[:, :130].float()) and torch.equal(scales, full_scales)


def _block_saved_per_token(fp8: bool, dense: bool, overrides=(), batch=2, seq=256):
    from mtrain.config.loading import load_config
    from mtrain.model.block import DecoderLayer
    from mtrain.model.groups import ModelGroups
    from mtrain.model.rope import rope_tables
    from tests.unit.test_fp8 import FP8_TINY

    cfg = load_config([*FP8_TINY, *overrides]).model
    torch.manual_seed(0)
    layer = DecoderLayer(cfg, 0 if dense else cfg.first_k_dense, ModelGroups(fp8=fp8))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    cos, sin = rope_tables(cfg, seq)
    with Saved() as saved:
        layer(x, cos, sin)
    # The block input is the caller's; the estimate counts it (the first norm's input).
    kept = saved.bytes(exclude=[*layer.parameters(), cos, sin]) + x.numel() * x.element_size()
    return cfg, kept / (batch * seq)


def test_activation_estimate_follows_what_the_blocks_keep():
    """The planner's per-token activation estimate against the bytes the
    autograd graph of one dense and one MoE block really keeps (fp32 rows,
    measured at two token counts so the weights' FP8 copies drop out), with
    and without FP8 and selective recompute: what FP8 and what selective
    recompute save are the estimate's to the percent, and the totals are
    within what the estimate leaves out (reciprocal RMS values, softmax
    statistics, router internals)."""
    from mtrain.model.stats import FP8_ROW_BYTES_PER_ELEMENT, layer_activation_elements

    ratio = FP8_ROW_BYTES_PER_ELEMENT / 4
    for dense in (True, False):
        measured, estimate = {}, {}
        for fp8 in (False, True):
            for recompute in ("none", "selective"):
                overrides = [f"model.recompute={recompute}"]
                cfg, small = _block_saved_per_token(fp8, dense, overrides, batch=2)
                _, large = _block_saved_per_token(fp8, dense, overrides, batch=4)
                measured[fp8, recompute] = 2 * large - small  # per token, without what does not grow with tokens
                estimate[fp8, recompute] = 4 * layer_activation_elements(cfg, dense, 1, 1, ratio if fp8 else None)
        for a, b in (((False, "none"), (True, "none")), ((False, "none"), (False, "selective")),
                     ((True, "none"), (True, "selective"))):
            saved = measured[a] - measured[b]
            assert saved > 0 and abs(saved - (estimate[a] - estimate[b])) < 0.01 * saved, (dense, a, b, measured,
                                                                                           estimate)
        for key in measured:
            assert 0.85 < estimate[key] / measured[key] <= 1.0, (dense, key, measured, estimate)


def test_nothing_is_quantized_for_a_backward_under_no_grad():
    torch.manual_seed(7)
    x, w = torch.randn(64, 128), torch.randn(128, 128) * 0.05
    with torch.no_grad():
        y = fp8_linear(x, w)
        z = fp8_swiglu_linear(x, x, w)
    assert not hasattr(x, "_mtrain_fp8_columns")
    assert torch.equal(y, fp8_linear(x, w.requires_grad_()).detach())
    assert torch.equal(z, fp8_swiglu_linear(x, x, w).detach())

