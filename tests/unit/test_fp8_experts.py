"""The routed experts in FP8 (docs/fp8.md): the grouped FP8 GEMM is
``fp8_linear`` run expert by expert (ragged and empty experts included), and
the model with FP8 routed experts trains like one whose experts call
``fp8_linear`` per expert; the metrics' census of FP8 GEMMs reads the model."""
import json
import types

import torch

from mtrain.config.loading import load_config
from mtrain.config.validate import fp8_width_errors
from mtrain.model.fp8 import dequantize_tiles, quantize_blocks, quantize_expert_blocks, quantize_tiles
from mtrain.model.fp8_linear import fp8_grouped_linear, fp8_linear, fp8_swiglu_linear
from mtrain.model.moe.deepep import dispatch_input, received_rows
from mtrain.model.moe.dispatch import DispatchPlan
from mtrain.model.moe.experts import GroupedExperts
from mtrain.model.moe.fp8_dispatch import FP8GradientOp, FP8PayloadOp, decode, encode, payload_row_bytes
from mtrain.runtime.comm import IdentityOp
from mtrain.runtime.context import StepContext
from mtrain.train.metrics import gemm_precision_census, merge_censuses
from mtrain.train.reporting import Reporter
from tests.unit.test_fp8 import FP8_TINY
from tests.unit.test_fp8_training import batch, build

COUNTS = [130, 0, 5, 61]  # ragged (130: one full tile of tokens and 2 more), empty, tiny


def operands(n=192, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(COUNTS)
    return (torch.randn(rows, k, generator=g), torch.randn(len(COUNTS), n, k, generator=g) * 0.05,
            torch.randn(rows, n, generator=g))


def per_expert(x, w, dy, tiles_input=False):
    """fp8_linear on every expert's rows: output, input gradient, weight gradients."""
    ys, dxs, dws, start = [], [], [], 0
    for e, c in enumerate(COUNTS):
        xe = x[start:start + c].detach().clone().requires_grad_(True)
        we = w[e].detach().clone().requires_grad_(True)
        y = fp8_linear(xe, we)
        y.backward(dy[start:start + c])
        ys.append(y.detach())
        dxs.append(xe.grad)
        dws.append(we.grad)
        start += c
    return torch.cat(ys), torch.cat(dxs), torch.stack(dws)


def grouped(x, w, dy, tiles=None):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fp8_grouped_linear(x, w, COUNTS, tiles)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def test_expert_blocks_are_each_experts_padded_blocks():
    _, w, _ = operands()
    qw, sw = quantize_expert_blocks(w)
    assert qw.shape == (4, 256, 256) and sw.shape == (4, 2, 2)
    for e in range(w.shape[0]):
        q, s = quantize_blocks(torch.nn.functional.pad(w[e], (0, 0, 0, 64)))
        assert torch.equal(qw[e].view(torch.uint8), q.view(torch.uint8)) and torch.equal(sw[e], s)


def test_grouped_fp8_gemm_is_fp8_linear_per_expert():
    x, w, dy = operands()
    y, dx, dw = grouped(x, w, dy)
    ry, rdx, rdw = per_expert(x, w, dy)
    # The same reference GEMMs on the same rows: bit for bit, forward and both gradients.
    assert torch.equal(y, ry) and torch.equal(dx, rdx) and torch.equal(dw, rdw)
    assert torch.count_nonzero(dw[1]) == 0 and torch.count_nonzero(dw[0]) > 0  # the empty expert
    # Not the high-precision product: FP8 rounding shows (E4M3's few percent).
    rel = ((y[:130] - x[:130] @ w[0].t()).norm() / y[:130].norm()).item()
    assert 1e-3 < rel < 0.1, rel


def test_grouped_fp8_gemm_takes_dispatched_tiles():
    """Rows that arrived as FP8 tiles: Fprop uses the tiles as they are and
    equals fp8_linear on their dequantized values (which requantize to the
    same tiles); Wgrad quantizes those values along T."""
    x, w, dy = operands(seed=1)
    data, scales = quantize_tiles(x)
    held = dequantize_tiles(data, scales)
    y, dx, dw = grouped(held, w, dy, (data, scales))
    ry, rdx, rdw = per_expert(held, w, dy)
    torch.testing.assert_close(y, ry, rtol=0, atol=0)
    torch.testing.assert_close(dx, rdx, rtol=0, atol=0)
    torch.testing.assert_close(dw, rdw, rtol=0, atol=0)


def test_grouped_fp8_weight_grad_defers():
    x, w, dy = operands(seed=2)
    _, _, immediate = grouped(x, w, dy)
    w = w.clone().requires_grad_(True)
    step = StepContext()
    with step.bound():
        y = fp8_grouped_linear(x, w, COUNTS)
    with step.deferring_weight_grads() as pending:
        y.backward(dy)
    assert w.grad is None
    pending.run()
    assert torch.equal(w.grad, immediate)


def test_widths_include_the_routed_experts():
    cfg = load_config(["model.moe_ffn_hidden_size=192", "model.num_shared_experts=0"]).model
    errors = fp8_width_errors(cfg, 1)
    assert any("model.moe_ffn_hidden_size / parallel.expert_tp" in e and "192 / 1)=192" in e for e in errors), errors
    assert not any("expert_tp" in e for e in fp8_width_errors(load_config(list(FP8_TINY)).model, 1))
    # 256 splits over expert_tp=2 into 128 (fine), over 4 into 64 (not a whole tile).
    wide = load_config([*FP8_TINY, "model.moe_ffn_hidden_size=256"]).model
    assert not any("expert_tp" in e for e in fp8_width_errors(wide, 1, 2))
    assert any("256 / 4)=64" in e for e in fp8_width_errors(wide, 1, 4))


def test_payload_round_trip_and_bytes():
    """The dispatch payload carries the tiles bit for bit, in fewer bytes."""
    g = torch.Generator().manual_seed(3)
    rows = torch.cat([torch.randn(7, 256, generator=g), torch.rand(7, 2, generator=g)], 1).to(torch.bfloat16)
    data, scales = quantize_tiles(rows[:, :256])
    got = decode(encode(data, scales, rows[:, 256:]), 256, 2, torch.bfloat16)
    assert torch.equal(got[0].view(torch.uint8), data.view(torch.uint8)) and torch.equal(got[1], scales)
    assert torch.equal(got[2], rows[:, 256:])
    assert payload_row_bytes(256, 2, torch.bfloat16, True) == 256 + 2 * 4 + 2 * 2
    assert payload_row_bytes(256, 2, torch.bfloat16, False) == (256 + 2) * 2
    plan = DispatchPlan(2, 7, IdentityOp(), IdentityOp())
    op = FP8PayloadOp(IdentityOp(), plan)
    out = op.start(rows).wait()
    assert op.row_bytes == payload_row_bytes(256, 2, torch.bfloat16, True)
    assert torch.equal(plan.received_tiles[1], scales)
    assert torch.equal(out[:, 256:], rows[:, 256:])
    assert torch.equal(out[:, :256], dequantize_tiles(data, scales).to(torch.bfloat16))
    # DeepEP's form of the same payload: (E4M3, fp32 scales per 128 channels), fp32 weights.
    (q, s), weights = dispatch_input(rows, 2, fp8=True)
    assert torch.equal(q.view(torch.uint8), data.view(torch.uint8)) and torch.equal(s, scales)
    assert weights.dtype == torch.float32 and torch.equal(weights, rows[:, 256:].float())
    deep_plan = DispatchPlan(2, 7, None, None)
    assert torch.equal(received_rows((q, s), weights, deep_plan, torch.bfloat16), out)
    assert deep_plan.received_tiles[0] is q
    plain, _ = dispatch_input(rows, 2, fp8=False)
    assert torch.equal(received_rows(plain, weights, DispatchPlan(2, 7, None, None), torch.bfloat16), rows)


def _per_expert_forward(self, x, counts, tiles=None):
    """The reference experts: the plain FP8 layers per expert (on the rows as held)."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        xe = x[start:start + c]
        outs.append(fp8_swiglu_linear(fp8_linear(xe, self.gate[e]), fp8_linear(xe, self.up[e]), self.down[e]))
        start += c
    return torch.cat(outs)


def test_model_with_fp8_routed_experts_trains_like_per_expert_reference():
    cfg, model = build(True)
    _, ref = build(True)
    experts = [m for m in ref.modules() if isinstance(m, GroupedExperts)]
    assert experts and all(m.fp8 for m in experts)
    for m in experts:
        m.forward = types.MethodType(_per_expert_forward, m)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0) for m in (model, ref)]
    for i in range(2):
        data = batch(cfg, seed=i)
        losses = []
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            loss = m(data).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
        grads = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
        for opt in opts:
            opt.step()
    # The routed experts were not the high-precision ones: their gradients differ from those.
    _, hp = build(False)
    hp(batch(cfg, seed=0)).loss.backward()
    name = "layers.1.mlp.experts.down"
    _, fresh = build(True)
    fresh(batch(cfg, seed=0)).loss.backward()
    a, b = dict(fresh.named_parameters())[name].grad, dict(hp.named_parameters())[name].grad
    assert 1e-3 < ((a - b).norm() / b.norm()).item() < 0.5


def test_census_reads_which_gemms_run_fp8(tmp_path):
    cfg, model = build(True)
    census = gemm_precision_census(model)
    fp8, high = census["fp8_gemms"], census["high_precision_gemms"]
    moe_layers = cfg.num_layers + cfg.mtp_depth - cfg.first_k_dense
    attn = cfg.num_layers + cfg.mtp_depth
    assert fp8 == {"attention_proj": 5 * attn, "dense_mlp": 3 * cfg.first_k_dense,
                   "shared_experts": 3 * moe_layers, "routed_experts": 3 * moe_layers,
                   "dispatch_payload": moe_layers, "mtp_proj": cfg.mtp_depth}, fp8
    assert high == {"embedding": 1, "output_head": 1, "router": moe_layers, "attention_core": attn}, high
    # Turning one layer's flag off moves exactly its sites.
    model.layers["1"].mlp.experts.fp8 = False
    moved = gemm_precision_census(model)
    assert moved["fp8_gemms"]["routed_experts"] == 3 * (moe_layers - 1)
    assert moved["high_precision_gemms"]["routed_experts"] == 3
    off = gemm_precision_census(build(False)[1])
    assert off["fp8_gemms"] == {} and sum(off["high_precision_gemms"].values()) == sum(fp8.values()) + sum(high.values())
    assert merge_censuses([census, census])["fp8_gemms"]["mtp_proj"] == 2 * cfg.mtp_depth
    # It goes into the run's first metrics.jsonl record.
    run_cfg = load_config(["train.steps=2", "logging.progress=false"])
    reporter = Reporter(tmp_path, run_cfg, stream=open(tmp_path / "console", "w"))
    first = {"step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "tflops_per_device": 1.0,
             "peak_memory_gb": 0.0, "step_time_s": 1.0}
    reporter.log({**first, **census})
    reporter.log({**first, "step": 2})
    reporter.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["fp8_gemms"] == fp8 and records[0]["high_precision_gemms"] == high
    assert records[1]["fp8_gemms"] is None


def test_fp8_moe_layer_runs_step_by_step_as_plain():
    """The FP8 dispatch payload through the runtime's step-by-step run (the
    exchanges' sent and received tensors released as in a pipeline) gives
    the plain run's output and gradients bit for bit."""
    from mtrain.model.groups import ModelGroups
    from mtrain.model.moe.layer import MoECarry, MoELayer
    from mtrain.runtime.program import Recording, backward_steps, drain, forward_steps, run_plain

    cfg = load_config([*FP8_TINY, "model.aux_loss_alpha=0"]).model
    torch.manual_seed(0)
    moe = MoELayer(cfg, ModelGroups(fp8=True))
    x = torch.randn(2, 8, cfg.hidden_size, requires_grad=True)
    dy = torch.randn(2, 8, cfg.hidden_size)
    y = run_plain(moe.standalone_program(), MoECarry(normed=x), StepContext()).hidden
    y.backward(dy)
    expected = [y.detach(), x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    x.grad = None
    moe.zero_grad()
    rec = Recording(StepContext())
    final = drain(forward_steps(moe.standalone_program(), MoECarry(normed=x), rec))
    grads = drain(backward_steps(rec, {"hidden": dy}))
    got = [final.hidden.detach(), grads["normed"]] + [p.grad for p in moe.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_combine_backward_sends_the_gradient_as_fp8_tiles():
    """The combine's forward is untouched; its transpose hands on exactly the
    dequantized 1x128 tiles of the gradient, sent as E4M3 bytes plus scales
    (or, off the wire, quantized on arrival: the same values)."""
    torch.manual_seed(9)
    rows, grad = torch.randn(5, 256), torch.randn(5, 256) * 1e-3
    for on_wire in (True, False):
        op = FP8GradientOp(IdentityOp(), on_wire)
        assert op.start(rows).wait() is rows
        got = op.start_transpose(grad).wait()
        assert got.dtype == grad.dtype and torch.equal(got, dequantize_tiles(*quantize_tiles(grad)))
        assert not torch.equal(got, grad)
        assert op.row_bytes == (256 + 2 * 4 if on_wire else 256 * 4)
    data, scales = quantize_tiles(grad)
    back = decode(encode(data, scales), 256, 0, torch.float32)
    assert back[2] is None and torch.equal(back[0].view(torch.uint8), data.view(torch.uint8))
    assert torch.equal(back[1], scales)
