"""Single-process checks of the dense building blocks against formulas and hand-computed numbers."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mtrain.config.loading import load_config
from mtrain.model.attention import MLAttention
from mtrain.model.mlp import DenseMLP
from mtrain.model.norm import RMSNorm
from mtrain.model.params import meta, tag
from mtrain.model.rope import (apply_rope, rope_frequencies, rope_tables, softmax_scale, yarn_correction_range,
                               yarn_mscale)
from mtrain.model.sharding import load_full_state_dict, shard_full_state_dict
from mtrain.model.tp import VocabParallelEmbedding, padded_vocab, vocab_parallel_cross_entropy
from mtrain.runtime.context import StepContext


@pytest.fixture(scope="module")
def cfg():
    return load_config().model


def v3_rope_cfg(**changes):
    """DeepSeek-V3's rope settings (64 rope dims, YaRN factor 40 over 4096)."""
    base = dict(qk_rope_head_dim=64, qk_nope_head_dim=128, rope_theta=10000.0, rope_scaling_factor=40.0,
                rope_original_max_seq_len=4096, yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=1.0,
                yarn_mscale_all_dim=1.0)
    base.update(changes)
    return type("RopeCfg", (), base)


# --- RMSNorm ------------------------------------------------------------------------------

def test_rmsnorm_matches_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6))
    x = torch.randn(3, 6)
    x64, w64 = x.double(), norm.weight.detach().double()
    expected = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-6) * w64
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-6, atol=1e-7)
    out_bf16 = norm(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), norm(x.bfloat16().float()).bfloat16().float())
    assert meta(norm.weight).no_decay


def test_rmsnorm_gradients_and_what_it_keeps():
    """Gradients equal autograd through the formula in float64; the backward
    keeps the input in its own dtype and one fp32 value per row, nothing else."""
    torch.manual_seed(1)
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
        dy = torch.randn(3, 5, 64, dtype=dtype)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = norm(x)
        assert sorted((tuple(t.shape), t.dtype) for t in saved if t is not norm.weight) == \
            [((3, 5, 1), torch.float32), ((3, 5, 64), dtype)]
        norm.weight.grad = None
        y.backward(dy)
        x64 = x.detach().double().requires_grad_()
        w64 = norm.weight.detach().double().requires_grad_()
        (x64 * torch.rsqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-6) * w64).backward(dy.double())
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=tol, atol=tol)


# --- rope / YaRN ----------------------------------------------------------------------------

def test_plain_rope_tables_match_formula():
    c = v3_rope_cfg(qk_rope_head_dim=8, rope_scaling_factor=1.0)
    cos, sin = rope_tables(c, 5)
    assert cos.shape == sin.shape == (5, 4)
    for pos in range(5):
        for i in range(4):
            angle = pos * 10000.0 ** (-2 * i / 8)
            assert cos[pos, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin[pos, i].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_yarn_correction_range_and_ramp_for_deepseek_v3():
    # dim * ln(4096 / (beta * 2 pi)) / (2 ln 10000): beta=32 -> 10.47 (floor 10), beta=1 -> 22.51 (ceil 23).
    assert yarn_correction_range(32.0, 1.0, 64, 10000.0, 4096) == (10, 23)
    plain = torch.tensor([10000.0 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    freqs = rope_frequencies(v3_rope_cfg())
    torch.testing.assert_close(freqs[:11], plain[:11])  # high frequencies kept
    torch.testing.assert_close(freqs[23:], plain[23:] / 40.0)  # low frequencies interpolated
    ramp = (16 - 10) / (23 - 10)
    assert freqs[16].item() == pytest.approx(plain[16].item() * ((1 - ramp) + ramp / 40.0), rel=1e-12)


def test_yarn_mscale_and_softmax_scale():
    assert yarn_mscale(40.0, 1.0) == pytest.approx(1.3689, abs=1e-4)
    assert yarn_mscale(1.0, 1.0) == 1.0
    assert yarn_mscale(0.5, 1.0) == 1.0
    assert softmax_scale(v3_rope_cfg()) == pytest.approx(192 ** -0.5 * 1.3689 ** 2, rel=1e-4)
    assert softmax_scale(v3_rope_cfg(rope_scaling_factor=1.0)) == pytest.approx(192 ** -0.5)
    # Equal mscale and mscale_all_dim: the tables carry no amplitude.
    cos, sin = rope_tables(v3_rope_cfg(), 3)
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.ones(3, 32))


def test_apply_rope_rotates_interleaved_pairs():
    c = v3_rope_cfg(qk_rope_head_dim=4, rope_scaling_factor=1.0)
    cos, sin = rope_tables(c, 3)
    x = torch.zeros(3, 1, 4)
    x[:, 0, 0] = 1.0  # real part of pair 0
    x[:, 0, 3] = 1.0  # imaginary part of pair 1
    out = apply_rope(x, cos, sin)
    for pos in range(3):
        f1 = pos * 10000.0 ** (-2 / 4)
        expected = [math.cos(pos), math.sin(pos), -math.sin(f1), math.cos(f1)]
        torch.testing.assert_close(out[pos, 0], torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("factor", [1.0, 40.0])
def test_rope_keeps_norms_and_dot_products_depend_on_offset_only(factor):
    c = v3_rope_cfg(qk_rope_head_dim=16, rope_scaling_factor=factor)
    cos, sin = rope_tables(c, 40)
    torch.manual_seed(0)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rq = apply_rope(q.expand(40, 1, 16), cos, sin)[:, 0]
    rk = apply_rope(k.expand(40, 1, 16), cos, sin)[:, 0]
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(40), rtol=1e-6, atol=0)
    # q at position m, k at n: the score depends on m - n only.
    for m, n, shift in [(5, 2, 10), (0, 7, 30), (3, 3, 25)]:
        assert (rq[m] @ rk[n]).item() == pytest.approx((rq[m + shift] @ rk[n + shift]).item(), abs=1e-5)


# --- MLA ------------------------------------------------------------------------------------

def reference_mla(m: MLAttention, cfg, x: torch.Tensor) -> torch.Tensor:
    """MLA written out with explicit per-head scores and a causal mask, in fp64."""
    x = x.double()
    w = {n: p.detach().double() for n, p in m.named_parameters()}
    cos, sin = (t.double() for t in rope_tables(cfg, x.shape[1]))

    def norm(t, weight):
        return t / torch.sqrt((t ** 2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * weight

    b, s, _ = x.shape
    h, dn, dr, dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = norm(x @ w["q_a.weight"].T, w["q_a_norm.weight"]) @ w["q_b.weight"].T
    q = q.view(b, s, h, dn + dr)
    kv_a = x @ w["kv_a.weight"].T
    kv = norm(kv_a[..., :cfg.kv_lora_rank], w["kv_a_norm.weight"]) @ w["kv_b.weight"].T
    kv = kv.view(b, s, h, dn + dv)
    q_pe = apply_rope(q[..., dn:], cos, sin)
    k_pe = apply_rope(kv_a[..., None, cfg.kv_lora_rank:], cos, sin)
    scores = (torch.einsum("bshd,bthd->bhst", q[..., :dn], kv[..., :dn])
              + torch.einsum("bshd,btd->bhst", q_pe, k_pe[:, :, 0])) * softmax_scale(cfg)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhst,bthd->bshd", probs, kv[..., dn:]).reshape(b, s, h * dv)
    return out @ w["o_proj.weight"].T


def test_mla_matches_written_out_reference(cfg):
    torch.manual_seed(0)
    m = MLAttention(cfg)
    x = torch.randn(2, 7, cfg.hidden_size)
    cos, sin = rope_tables(cfg, 7)
    torch.testing.assert_close(m(x, cos, sin).double(), reference_mla(m, cfg, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_mla_is_causal(cfg, q_lora_rank):
    cfg = load_config([f"model.q_lora_rank={q_lora_rank}"]).model
    torch.manual_seed(0)
    m = MLAttention(cfg)
    cos, sin = rope_tables(cfg, 8)
    x = torch.randn(1, 8, cfg.hidden_size)
    changed = x.clone()
    changed[0, 5] += 1.0
    out, out_changed = m(x, cos, sin), m(changed, cos, sin)
    assert torch.equal(out[:, :5], out_changed[:, :5])
    assert not torch.allclose(out[:, 5:], out_changed[:, 5:])


def _output_and_grads(m: nn.Module, x: torch.Tensor, cos, sin):
    x = x.clone().requires_grad_(True)
    out = m(x, cos, sin)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}


def test_selective_recompute_is_bitwise_identical(cfg):
    torch.manual_seed(0)
    plain = MLAttention(cfg)
    recomputed = MLAttention(load_config(["model.recompute=selective"]).model)
    recomputed.load_state_dict(plain.state_dict())
    assert recomputed.selective_recompute and not plain.selective_recompute
    cos, sin = rope_tables(cfg, 6)
    x = torch.randn(2, 6, cfg.hidden_size)
    a, b = _output_and_grads(plain, x, cos, sin), _output_and_grads(recomputed, x, cos, sin)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name


def test_mla_weight_grads_can_be_deferred(cfg):
    torch.manual_seed(0)
    m = MLAttention(load_config(["model.recompute=selective"]).model)
    cos, sin = rope_tables(cfg, 6)
    x = torch.randn(2, 6, cfg.hidden_size)
    _, x_grad, expected = _output_and_grads(m, x, cos, sin)
    m.zero_grad(set_to_none=True)
    step = StepContext()  # bound in the forward, deferring in the backward
    with step.bound(), step.deferring_weight_grads() as pending:
        _, deferred_x_grad, now = _output_and_grads(m, x, cos, sin)
    linears = [n for n in now if n.endswith(".weight") and "norm" not in n]
    assert all(now[n] is None for n in linears) and len(pending) == len(linears)
    assert torch.equal(x_grad, deferred_x_grad)
    pending.run()
    for n, p in m.named_parameters():
        assert torch.equal(p.grad, expected[n]), n


def test_dense_mlp_matches_swiglu_formula():
    torch.manual_seed(0)
    mlp = DenseMLP(8, 12, None, 0.1)
    x = torch.randn(3, 8)
    g, u, d = mlp.gate.weight, mlp.up.weight, mlp.down.weight
    torch.testing.assert_close(mlp(x), (F.silu(x @ g.T) * (x @ u.T)) @ d.T)


# --- vocabulary -----------------------------------------------------------------------------

def test_vocab_cross_entropy_without_tp_matches_torch_and_ignores_padding():
    torch.manual_seed(0)
    vocab = 10
    logits = torch.randn(3, 4, 13)
    logits[..., vocab:] = 50.0  # padding columns would dominate if they were counted
    logits.requires_grad_(True)
    targets = torch.randint(0, vocab, (3, 4))
    targets[0, 0] = vocab - 1
    loss = vocab_parallel_cross_entropy(logits, targets, None, vocab)
    real = logits.detach()[..., :vocab].clone().requires_grad_(True)
    expected = F.cross_entropy(real.reshape(-1, vocab), targets.reshape(-1), reduction="none").view(3, 4)
    torch.testing.assert_close(loss, expected)
    weights = torch.rand(3, 4)
    (loss * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(logits.grad[..., :vocab], real.grad)
    assert torch.equal(logits.grad[..., vocab:], torch.zeros(3, 4, 3))


def test_embedding_without_tp_is_a_lookup():
    emb = VocabParallelEmbedding(11, 4, None, 0.02)
    ids = torch.tensor([[0, 10, 3]])
    assert torch.equal(emb(ids), emb.weight[ids[0]][None])
    assert padded_vocab(1023, 2) == 1024 and padded_vocab(1024, 4) == 1024 and padded_vocab(5, 4) == 8


# --- sharding -------------------------------------------------------------------------------

class TaggedToy(nn.Module):
    """One parameter of every tag kind, with the local shapes of a (tp, ep, expert_tp) rank."""

    def __init__(self, tp: int = 1, ep: int = 1, expert_tp: int = 1):
        super().__init__()
        self.column = tag(nn.Parameter(torch.zeros(8 // tp, 6)), shard_dim=0, shard_group="tp")
        self.row = tag(nn.Parameter(torch.zeros(6, 8 // tp)), shard_dim=1, shard_group="tp")
        self.vocab = tag(nn.Parameter(torch.zeros(padded_vocab(7, tp) // tp, 3)), shard_dim=0, shard_group="tp",
                         full_size=7)
        self.experts = tag(nn.Parameter(torch.zeros(4 // ep, 6, 4 // expert_tp)), expert=True, shard_dim=2,
                           shard_group="expert_tp")
        self.expert_rows = tag(nn.Parameter(torch.zeros(4 // ep, 6)), expert=True)
        self.norm = tag(nn.Parameter(torch.zeros(6)), no_decay=True)
        self.plain = nn.Parameter(torch.zeros(2, 2))
        self.register_buffer("table", torch.zeros(5))


def test_shard_round_trip_with_every_tag_kind():
    torch.manual_seed(0)
    full = {k: torch.randn_like(v) for k, v in TaggedToy().state_dict().items()}
    shards = {}
    for t in range(2):
        for e in range(2):
            for x in range(2):
                coords = {"tp": (t, 2), "ep": (e, 2), "expert_tp": (x, 2)}
                local = TaggedToy(tp=2, ep=2, expert_tp=2)
                load_full_state_dict(local, full, coords)
                shards[t, e, x] = {k: v.detach() for k, v in local.state_dict().items()}

    s = shards
    torch.testing.assert_close(torch.cat([s[0, 0, 0]["column"], s[1, 0, 0]["column"]]), full["column"])
    torch.testing.assert_close(torch.cat([s[0, 0, 0]["row"], s[1, 0, 0]["row"]], 1), full["row"])
    vocab = torch.cat([s[0, 0, 0]["vocab"], s[1, 0, 0]["vocab"]])
    assert vocab.shape == (8, 3)
    torch.testing.assert_close(vocab[:7], full["vocab"])
    assert torch.equal(vocab[7], torch.zeros(3))  # the padding row
    experts = torch.cat([torch.cat([s[0, e, x]["experts"] for x in range(2)], 2) for e in range(2)], 0)
    torch.testing.assert_close(experts, full["experts"])
    torch.testing.assert_close(s[0, 1, 0]["experts"], full["experts"][2:4, :, 0:2])
    torch.testing.assert_close(s[0, 1, 1]["expert_rows"], full["expert_rows"][2:4])
    for key in ("norm", "plain", "table"):
        for shard in s.values():
            torch.testing.assert_close(shard[key], full[key])


def test_shard_rejects_coords_that_do_not_fit_the_module():
    full = TaggedToy().state_dict()
    with pytest.raises(ValueError, match="column.*shape"):
        shard_full_state_dict(TaggedToy(tp=2), full, {"tp": (0, 4)})
    with pytest.raises(KeyError, match="plain"):
        shard_full_state_dict(TaggedToy(), {k: v for k, v in full.items() if k != "plain"}, {})


def test_padding_the_values_for_flash_attention_changes_nothing():
    from mtrain.model.attention import attention_core

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 16, 24, requires_grad=True), torch.randn(2, 4, 16, 24, requires_grad=True)
    v = torch.randn(2, 4, 16, 16, requires_grad=True)
    results = []
    for pad in (False, True):
        for t in (q, k, v):
            t.grad = None
        out = attention_core(q, k, v, 0.2, pad_values=pad)
        assert out.shape == (2, 4, 16, 16)
        (out * torch.arange(16.0)).sum().backward()
        results.append([out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for padded, plain in zip(results[1], results[0]):
        torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
