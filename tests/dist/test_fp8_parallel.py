"""train.fp8=blockwise under tensor, expert and pipeline parallelism, and its resume.

Every TP shard of every FP8 GEMM is 128-aligned at tp=2 (``TP_ALIGNED``), so
a TP rank quantizes exactly the single-rank model's tiles and blocks. The
forward is then the same computation (losses equal to fp32 round-off), but
the FP8 gradients of tp=2 and tp=1 differ by a few percent: fp32 round-off
differences (the vocab-parallel head, all-reduced partial sums) flip an
occasional E4M3 rounding, and a flipped element perturbs every later GEMM of
the backward (docs/fp8.md, "Tensor parallelism"). Both are FP8 gradients of
the same size of error, which is what is checked.
"""
import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.model.groups import ModelGroups
from mtrain.model.model import ModelChunk, initialize
from mtrain.model.params import meta
from mtrain.model.sharding import shard_tensor
from mtrain.parallel.groups import create_groups
from mtrain.parallel.layout import build_layout
from mtrain.runtime.context import StepContext
from mtrain.testing import run_distributed
from mtrain.train.preflight import config_errors

# q_b: 2 heads x (64 + 64) rows per rank, kv_b: 2 x (64 + 64), o_proj: 2 x 64 inputs,
# dense and shared MLPs: 128 per rank.
TP_ALIGNED = ("model.hidden_size=128", "model.q_lora_rank=128", "model.kv_lora_rank=128",
              "model.ffn_hidden_size=256", "model.moe_ffn_hidden_size=256", "model.num_heads=4",
              "model.qk_nope_head_dim=64", "model.qk_rope_head_dim=64", "model.v_head_dim=64")
SEED = 7


def model_cfg(fp8=True):
    return load_config(["train.fp8=blockwise" if fp8 else "train.fp8=none", *TP_ALIGNED]).model


def data(cfg, batch=2, seq=32):
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(100))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _rank_tp2():
    layout = build_layout(2, tp=2, ep=1, expert_tp=1)
    groups = create_groups(layout, timeout_s=30)
    coords = {kind: (groups.index(kind), groups.size(kind)) for kind in ("tp", "ep", "expert_tp")}
    cfg = model_cfg()
    chunk = ModelChunk(cfg, list(range(cfg.num_layers)),
                       groups=ModelGroups(tp=groups.group("tp"), ep=groups.group("ep"),
                                          expert_tp=groups.group("expert_tp"), dispatcher="alltoall", fp8=True))
    initialize(chunk, SEED, cfg.init_std, coords)
    out = chunk(data(cfg))
    out.loss.backward()
    return {"loss": out.loss.item(), "grads": {n: p.grad.clone() for n, p in chunk.named_parameters()},
            "coords": coords, "expert_dp": groups.ranks("expert_dp")}


def single_process(fp8: bool, dtype=torch.float32):
    cfg = model_cfg(fp8)
    model = ModelChunk(cfg, list(range(cfg.num_layers)), groups=ModelGroups(fp8=fp8)).to(dtype)
    initialize(model, SEED, cfg.init_std)
    out = model(data(cfg))
    out.loss.backward()
    return out.loss.item(), dict(model.named_parameters())


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_tp2_fp8_is_as_close_to_the_exact_gradient_as_tp1():
    assert config_errors(load_config(["train.fp8=blockwise", *TP_ALIGNED, "parallel.tp=2"])) == []
    results = run_distributed(_rank_tp2, 2, timeout=120)
    loss1, fp8 = single_process(True)
    _, exact = single_process(False, torch.float64)
    # The forward quantizes the same tiles and blocks: the loss agrees to fp32 round-off
    # (measured: 1e-7 relative).
    for res in results:
        assert res["loss"] == pytest.approx(loss1, rel=1e-6, abs=0)
    res = results[0]
    worst = 0.0
    for name, grad in res["grads"].items():
        m = meta(fp8[name])
        if m.expert:  # each TP rank routed half the tokens: the expert-DP sum is the whole gradient
            grad = sum(results[s]["grads"][name] for s in res["expert_dp"])
        tp1 = shard_tensor(fp8[name].grad, m, res["coords"], name)
        ref = shard_tensor(exact[name].grad.float(), m, res["coords"], name)
        e1, e2, d = rel(tp1, ref), rel(grad, ref), rel(grad, tp1)
        # Measured: tp1 5-46 % from the fp64 gradient (E4M3 compounded over the
        # backward), tp2 0.98-1.07 times as far; tp2 vs tp1 3e-8 (head) to 5.8 % (layer 0's q_a).
        assert 0.75 < e2 / e1 < 1.33, (name, e1, e2)
        assert d < e1, (name, d, e1)
        worst = max(worst, d)
    assert worst > 1e-3  # the FP8 backward is not fp32-exact across layouts: see the module doc


def _first_step(overrides, world):
    from tests.dist.test_pipeline_model import _rank_step

    res = _rank_step(overrides, world)
    return {"losses": res["losses"], "dp": res["dp"]}


LAYOUTS = {  # DualPipe with tensor and with expert parallelism, 4 ranks each
    "dualpipe pp2 tp2": ["parallel.pp=2", "parallel.tp=2", "parallel.ep=1"],
    "dualpipe pp2 ep2 dp2": ["parallel.pp=2", "parallel.ep=2"],
    # All three at once: the expert group folded over the two TP ranks.
    "dualpipe pp2 tp2 ep2": ["parallel.pp=2", "parallel.tp=2", "parallel.ep=2"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_dualpipe_layouts_match_the_single_process_first_step(layout):
    from tests.dist.test_pipeline_model import config, microbatches

    overrides = ["train.fp8=blockwise", *TP_ALIGNED, *LAYOUTS[layout], "parallel.schedule=dualpipe",
                 "parallel.num_microbatches=4"]
    assert config_errors(config(overrides), world_size=4) == []
    results = run_distributed(_first_step, 4, overrides, 4, timeout=120)
    cfg = config(overrides)
    n = cfg.parallel.num_microbatches
    dp_size = max(r["dp"] for r in results) + 1
    model = ModelChunk(cfg.model, list(range(cfg.model.num_layers)), groups=ModelGroups(fp8=True))
    initialize(model, cfg.train.seed, cfg.model.init_std)
    with torch.no_grad():
        ref = [model(mb, step=StepContext()).loss.item() for mb in microbatches(cfg, n * dp_size)]
    got = {r["dp"] * n + mb: loss for r in results for mb, loss in r["losses"].items()}
    assert sorted(got) == list(range(n * dp_size))
    for mb, loss in got.items():
        assert loss == pytest.approx(ref[mb], rel=1e-5, abs=0), (layout, mb)


def test_fp8_resume_is_bit_exact(tmp_path):
    from tests.e2e.test_train import train

    overrides = ["train.fp8=blockwise", *TP_ALIGNED, "parallel.pp=2", "parallel.tp=2", "parallel.ep=1",
                 "parallel.schedule=dualpipe", "parallel.num_microbatches=4", "checkpoint.interval=100",
                 "train.steps=4"]
    straight = train(4, overrides, tmp_path / "a")
    first = train(4, overrides + ["train.exit_interval=2"], tmp_path / "b")
    assert max(first) == 2
    resumed = train(4, overrides, tmp_path / "b")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step]["loss"] == straight[step]["loss"], step
        assert resumed[step]["grad_norm"] == straight[step]["grad_norm"], step
