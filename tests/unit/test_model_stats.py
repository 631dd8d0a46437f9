import pytest
from omegaconf import OmegaConf

from mtrain.config.loading import load_config
from mtrain.model.stats import attention_params, flops_per_token, memory_estimate, param_counts, swiglu_params
from mtrain.pipeline.schedule_rules import peak_inflight_microbatches
from mtrain.pipeline.simulate import simulate

# configs/model/tiny.yaml written out by hand, piece by piece.
V, H, FFN, MOE_FFN = 1024, 64, 128, 32
EMBEDDING = HEAD = V * H                                  # 65536 each, untied
ATTENTION = (H * 32 + 32 + 32 * 4 * (16 + 8)              # q_a, q norm, q_b
             + H * (32 + 8) + 32 + 32 * 4 * (16 + 16)     # kv_a, kv norm, kv_b
             + 4 * 16 * H)                                # o_proj  -> 15936
NORMS = 2 * H                                             # per block
DENSE = 3 * H * FFN                                       # layer 0
ROUTED, SHARED, ROUTER = 8 * 3 * H * MOE_FFN, 3 * H * MOE_FFN, 8 * H
TINY_TOTAL = EMBEDDING + HEAD + 4 * (ATTENTION + NORMS) + DENSE + 3 * (ROUTED + SHARED + ROUTER) + H
MTP_MODULE = ATTENTION + NORMS + ROUTED + SHARED + ROUTER + 3 * H + 2 * H * H


@pytest.fixture(scope="module")
def tiny():
    return load_config().model


def test_tiny_param_counts_by_hand(tiny):
    counts = param_counts(tiny)
    assert counts["total"] == TINY_TOTAL == 387392
    assert sum(counts["breakdown"].values()) == counts["total"]
    assert counts["breakdown"]["attention"] == 4 * ATTENTION
    assert counts["breakdown"]["moe_routed"] == 3 * ROUTED
    # 2 of 8 routed experts per token; the embedding is a lookup, not counted.
    assert counts["activated"] == TINY_TOTAL - EMBEDDING - 3 * ROUTED * 6 // 8
    assert counts["mtp"] == MTP_MODULE
    assert counts["mtp_activated"] == MTP_MODULE - ROUTED * 6 // 8


def test_attention_count_matches_the_module(tiny):
    attention = pytest.importorskip("mtrain.model.attention")
    module = attention.MLAttention(tiny)
    assert sum(p.numel() for p in module.parameters()) == attention_params(tiny) == ATTENTION


def test_uncompressed_queries_and_mtp_depth(tiny):
    m = OmegaConf.merge(tiny, {"q_lora_rank": 0, "mtp_depth": 2})
    assert attention_params(m) == H * 4 * 24 + H * 40 + 32 + 32 * 4 * 32 + 4 * 16 * H
    assert param_counts(m)["mtp"] == 2 * (MTP_MODULE - ATTENTION + attention_params(m))
    assert swiglu_params(3, 5) == 45


def test_tiny_flops_by_hand(tiny):
    seq = 64
    matmul = param_counts(tiny)["activated"] - (4 * NORMS + H)  # norm weights are elementwise
    mtp_matmul = MTP_MODULE - ROUTED * 6 // 8 - 5 * H + HEAD     # + one more pass through the head
    # Per layer and token: 4 heads, (qk 24 + v 16) per key, causal: seq/2 keys on average.
    attention = 2 * 4 * (24 + 16) * seq / 2
    forward = 2 * (matmul + mtp_matmul) + 5 * attention
    assert flops_per_token(tiny, seq) == pytest.approx(3 * forward, rel=1e-12)
    assert flops_per_token(tiny, seq) == pytest.approx(2069376, rel=1e-12)
    no_mtp = OmegaConf.merge(tiny, {"mtp_depth": 0})
    assert flops_per_token(no_mtp, seq) == pytest.approx(3 * (2 * matmul + 4 * attention), rel=1e-12)
    # Only the attention core grows with the sequence.
    assert flops_per_token(tiny, 2 * seq) - flops_per_token(tiny, seq) == pytest.approx(3 * 5 * attention)


def _one_stage(cfg):
    return [{"layers": list(range(cfg.model.num_layers)), "embedding": True, "head": True, "mtp": True}]


def test_zero1_halves_optimizer_states_when_dp_doubles():
    cfg = load_config(["parallel=single", "train.dtype=bf16"])
    stage = _one_stage(cfg)
    two, four = (memory_estimate(cfg, stage, 1, world_size=w) for w in (2, 4))
    assert four["optimizer"] == pytest.approx(two["optimizer"] / 2, abs=1)
    assert four["weights"] == two["weights"] and four["activations"] == two["activations"]
    unsharded = load_config(["parallel=single", "train.dtype=bf16", "train.zero1=false"])
    assert memory_estimate(unsharded, stage, 1, world_size=4)["optimizer"] == \
        memory_estimate(unsharded, stage, 1, world_size=1)["optimizer"] == 12 * TINY_TOTAL + 12 * MTP_MODULE


def test_bytes_per_parameter_by_dtype():
    fp32 = load_config(["parallel=single", "train.dtype=fp32", "train.zero1=false"])
    bf16 = load_config(["parallel=single", "train.dtype=bf16", "train.zero1=false"])
    params = TINY_TOTAL + MTP_MODULE
    a = memory_estimate(fp32, _one_stage(fp32), 1, world_size=1)
    b = memory_estimate(bf16, _one_stage(bf16), 1, world_size=1)
    assert a["params"] == b["params"] == params
    assert (a["weights"], a["grads"], a["optimizer"]) == (4 * params, 4 * params, 8 * params)
    assert (b["weights"], b["grads"], b["optimizer"]) == (2 * params, 4 * params, 12 * params)
    assert b["total"] == b["weights"] + b["grads"] + b["optimizer"] + b["activations"]


def test_auto_dtype_is_planned_as_bf16_unless_the_backend_is_gloo():
    def estimate(*overrides):
        cfg = load_config(["parallel=single", "train.zero1=false", *overrides])
        return memory_estimate(cfg, _one_stage(cfg), 1, world_size=1)

    assert estimate() == estimate("parallel.backend=nccl") == estimate("train.dtype=bf16")
    assert estimate("parallel.backend=gloo") == estimate("train.dtype=fp32")
    assert estimate("train.dtype=bf16", "parallel.backend=gloo") == estimate("train.dtype=bf16")
    assert estimate()["weights"] < estimate("parallel.backend=gloo")["weights"]


def test_experts_split_over_ep_and_activations_scale_with_inflight():
    ep2 = load_config(["parallel=single", "parallel.ep=2", "train.zero1=false"])
    ep1 = load_config(["parallel=single", "train.zero1=false"])
    stage = _one_stage(ep1)
    assert memory_estimate(ep1, stage, 1, 2)["params"] - memory_estimate(ep2, stage, 1, 2)["params"] == \
        (3 * ROUTED + ROUTED) // 2  # half of the main model's and the MTP block's routed experts
    acts = [memory_estimate(ep1, stage, peak, 1)["activations"] for peak in (1, 2, 3)]
    assert acts[2] - acts[1] == acts[1] - acts[0] > 0


def test_recompute_lowers_activation_estimate():
    acts = {}
    for mode in ("none", "selective", "full"):
        cfg = load_config(["parallel=single", f"model.recompute={mode}"])
        acts[mode] = memory_estimate(cfg, _one_stage(cfg), 4, 1)["activations"]
    assert acts["full"] < acts["selective"] < acts["none"]


@pytest.mark.parametrize("schedule,pps", [("1f1b", (1, 2, 3, 4)), ("zb1p", (2, 4)),
                                          ("dualpipe", (2, 4, 6)), ("dualpipev", (1, 2, 3, 4))])
def test_peak_inflight_rule_matches_simulated_schedules(schedule, pps):
    for pp in pps:
        for n in sorted({2 * pp, 2 * pp + 2, 4 * pp} | ({1, pp - 1} if schedule in ("1f1b", "zb1p") else set())):
            if n < 1:
                continue
            sim = simulate(schedule, pp, n)
            assert [peak_inflight_microbatches(schedule, pp, n, r) for r in range(pp)] == \
                [rank.peak_activations for rank in sim.ranks], (schedule, pp, n)


def test_peak_inflight_rule_values():
    assert peak_inflight_microbatches("1f1b", 8, 32) == 8
    assert peak_inflight_microbatches("1f1b", 8, 3) == 3
    assert peak_inflight_microbatches("zb1p", 8, 32, pp_rank=5) == 3
    assert peak_inflight_microbatches("dualpipe", 8, 32, pp_rank=3) == 9
    assert peak_inflight_microbatches("dualpipev", 8, 32) == 17
    with pytest.raises(ValueError, match="parallel.schedule"):
        peak_inflight_microbatches("gpipe", 2, 4)
