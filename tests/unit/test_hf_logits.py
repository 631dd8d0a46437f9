"""A random ``transformers`` DeepSeek model converted to mtrain computes the same logits.

Each case saves a small random model with ``save_pretrained`` (several
shards), converts it with ``import_hf`` and compares mtrain's logits with
transformers' on the same tokens, fp32, to ``RTOL``/``ATOL`` (round-off:
attention kernels and the order of the expert sums differ). Every weight is
random and the V3 expert bias nonzero, so a mis-mapped tensor, rope order or
routing rule shows.
"""
import pytest
import torch

from tests.hf_models import load_mtrain, mtp_layer, mtp_tensors, random_model, save

pytest.importorskip("transformers")

RTOL, ATOL = 1e-5, 1e-5
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "rope_theta": 10000.0}

CASES = {
    # V3 as released: q compression, interleaved rope pairs, 2 groups keep 1, top-2 renormalised.
    "v3": ("deepseek_v3", {}),
    # Half-split rope (q_b and kv_a rope rows permuted on import) with YaRN beyond its original length.
    "v3_half_split_yarn": ("deepseek_v3", dict(rope_interleave=False, rope_parameters={
        **YARN, "mscale": 1.0, "mscale_all_dim": 1.0})),
    # Another router: 4 groups keep 2, top-3, no renormalisation, other scaling; no q compression;
    # YaRN whose mscale ratio scales the tables.
    "v3_router_q_proj": ("deepseek_v3", dict(q_lora_rank=None, n_group=4, topk_group=2, num_experts_per_tok=3,
                                             norm_topk_prob=False, routed_scaling_factor=1.7, rope_interleave=False,
                                             rope_parameters={**YARN, "mscale": 0.9, "mscale_all_dim": 0.7})),
    # DeepSeek-V2: softmax scores, groups scored by their best expert (group_limited_greedy).
    "v2_group_limited": ("deepseek_v2", dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4,
                                             topk_group=2, num_experts_per_tok=3, norm_topk_prob=False,
                                             routed_scaling_factor=2.0, n_shared_experts=2)),
    # DeepSeek-V2-Lite's routing (greedy, no groups) with q compression and YaRN (V2's mscale 0.707).
    "v2_greedy_yarn": ("deepseek_v2", dict(topk_method="greedy", n_group=None, topk_group=None,
                                           norm_topk_prob=False, rope_parameters={
                                               **YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
}


def _tokens(vocab, seq=48, seed=3):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    from mtrain.train.hf_import import import_hf

    model_type, overrides = CASES[case]
    hf = random_model(model_type, seed=len(case), **overrides)
    import_hf(save(hf, tmp_path / "hf"), tmp_path / "mtrain", progress=False)
    ours, cfg = load_mtrain(tmp_path / "mtrain")
    ids = _tokens(cfg.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.logits(ids)
    assert expected.abs().max() > 1.0  # not a degenerate model
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def test_mtp_module_matches_transformers_mtp_layer(tmp_path):
    """The MTP module in DeepSeek-V3's layer-61 layout (enorm, hnorm, eh_proj over
    [embedding; hidden], a decoder layer, shared_head.norm, the shared head)
    against transformers' ``MtpLayer`` given what mtrain's depth 1 sees at
    position i: token i+1 and the main model's last decoder-layer output at i
    (before the final norm; transformers' speculative decoding passes the
    normed one instead, see docs/hf.md)."""
    from transformers.masking_utils import create_causal_mask

    from mtrain.train.hf_import import import_hf

    hf = random_model("deepseek_v3", seed=11)
    mtp = mtp_layer(hf)
    import_hf(save(hf, tmp_path / "hf", extra=mtp_tensors(hf, mtp)), tmp_path / "mtrain", progress=False)
    ours, cfg = load_mtrain(tmp_path / "mtrain")
    assert cfg.mtp_depth == 1
    ids = _tokens(cfg.vocab_size, seq=32)
    captured = []
    hook = hf.model.layers[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        logits = hf(ids).logits
        hook.remove()
        hidden = captured[0][:, :-1]
        ahead = ids[:, 1:]
        positions = torch.arange(ahead.shape[1])[None]
        embeds = hf.model.embed_tokens(ahead)
        mask = create_causal_mask(config=hf.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                  position_ids=positions)
        expected = hf.lm_head(mtp(embeds, hidden, hf.model.rotary_emb(embeds, positions), mask, positions, None))
        main, depth1 = ours.logits(ids, mtp=True)
    torch.testing.assert_close(main, logits, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(depth1[:, :-1], expected, rtol=RTOL, atol=ATOL)
