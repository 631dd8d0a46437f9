import json
import subprocess
import sys

import pytest

PLAN = [sys.executable, "-m", "mtrain.cli.plan"]


def run(*args):
    return subprocess.run(PLAN + list(args), capture_output=True, text=True, timeout=120)


def test_json_plan_groups():
    out = run("parallel.tp=2", "parallel.ep=4", "parallel.pp=1", "parallel.schedule=1f1b",
              "cluster.gpus_per_node=8", "output=json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert (plan["world_size"], plan["tp"], plan["ep"], plan["expert_tp"], plan["pp"], plan["dp"]) == (8, 2, 4, 1, 1, 4)
    assert plan["groups"]["expert_dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan["errors"] == []


def test_text_plan_shows_stage_placement():
    out = run()
    assert out.returncode == 0, out.stderr
    assert "pp rank 0: stages [0, 1]" in out.stdout and "pp rank 1: stages [1, 0]" in out.stdout


def test_invalid_config_exits_2_naming_fields():
    out = run("parallel.pp=3", "parallel.schedule=dualpipe")
    assert out.returncode == 2
    assert "parallel.pp" in out.stderr and "even" in out.stderr
    assert "not a multiple of parallel.tp * parallel.pp" in out.stderr
    out = run("parallel.pp=3", "output=json")
    assert out.returncode == 2 and len(json.loads(out.stdout)["errors"]) >= 2


def test_bad_choice_exits_2_with_one_message_naming_field_value_and_choices():
    for args in (["parallel.schedule=gpipe"], ["parallel.schedule=gpipe", "output=json"]):
        out = run(*args)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip() == ("invalid config:\n  - parallel.schedule='gpipe' is not a valid choice; "
                                      "choose one of 1f1b, zb1p, dualpipe, dualpipev")


ONE_NODE = ("cluster.gpus_per_node=8", "parallel.pp=1", "parallel.ep=8", "parallel.schedule=1f1b")


def plan_json(*args):
    out = run(*args, "output=json")
    assert out.returncode == 0, out.stderr + out.stdout
    return json.loads(out.stdout)


def test_deepseek_v3_matches_published_parameter_counts():
    plan = plan_json("model=deepseek_v3", *ONE_NODE)
    assert plan["params_total"] == pytest.approx(671e9, rel=0.01)
    assert plan["params_activated"] == pytest.approx(37e9, rel=0.02)
    # The paper's 14B for the MTP module includes the embedding and head it shares.
    shared = plan["params_breakdown"]["embedding"] + plan["params_breakdown"]["head"]
    assert plan["params_mtp"] + shared == pytest.approx(14e9, rel=0.05)
    # Training FLOPs: at least 6 x activated non-embedding parameters, plus attention and MTP.
    assert 6 * plan["params_activated"] < plan["flops_per_token"] < 8 * plan["params_activated"]


def test_deepseek_v2_lite_matches_published_parameter_counts():
    plan = plan_json("model=deepseek_v2_lite", *ONE_NODE)
    assert plan["params_total"] == pytest.approx(15.7e9, rel=0.02)
    # Published as "2.4B": our 2.45B is within its rounding (2.5%).
    assert plan["params_activated"] == pytest.approx(2.4e9, rel=0.025)
    assert plan["params_mtp"] == 0 and not any(s["mtp"] for s in plan["stages"])


def test_plan_stages_and_memory_for_dualpipe():
    plan = plan_json("model=deepseek_v3", "cluster.gpus_per_node=8", "parallel.pp=4", "parallel.ep=2",
                     "parallel.schedule=dualpipe", "parallel.num_microbatches=8")
    stages = plan["stages"]
    assert [len(s["layers"]) for s in stages] == [15, 16, 15, 15]
    assert [s["pp_ranks"] for s in stages] == [[0, 3], [1, 2], [1, 2], [0, 3]]
    assert (stages[0]["embedding"], stages[-1]["head"], stages[-1]["mtp"]) == (True, True, True)
    assert [r["peak_inflight_microbatches"] for r in plan["memory"]] == [5] * 4
    # Ranks 0 and 3 hold the same stages (the two DualPipe copies).
    assert plan["memory"][0] == {**plan["memory"][3], "pp_rank": 0}
    for r in plan["memory"]:
        assert r["total"] == r["weights"] + r["grads"] + r["optimizer"] + r["activations"]


def test_plan_takes_auto_dtype_as_bf16_unless_the_backend_is_gloo():
    auto, gloo, fp32 = (plan_json("model=deepseek_v3", *ONE_NODE, *extra)
                        for extra in ((), ("parallel.backend=gloo",), ("train.dtype=fp32",)))
    assert (auto["dtype"], gloo["dtype"], fp32["dtype"]) == ("bf16", "fp32", "fp32")
    assert gloo["memory"] == fp32["memory"]
    assert auto["memory"][0]["weights"] * 2 == fp32["memory"][0]["weights"]


def test_plan_stages_for_dualpipev_and_explicit_layout():
    plan = plan_json("cluster.gpus_per_node=4", "parallel.pp=2", "parallel.schedule=dualpipev",
                     "parallel.pipeline_layout=[1,1,2,0]")
    assert [s["layers"] for s in plan["stages"]] == [[0], [1], [2, 3], []]
    assert [s["pp_ranks"] for s in plan["stages"]] == [[0], [1], [1], [0]]
    assert [r["peak_inflight_microbatches"] for r in plan["memory"]] == [5, 5]


def test_text_plan_shows_model_facts():
    out = run("model=deepseek_v3", *ONE_NODE, "train.dtype=bf16")
    assert out.returncode == 0, out.stderr
    assert "model deepseek_v3: 671.0B total, 36.6B activated, MTP 11.6B" in out.stdout
    assert "stage 0: layers 0-60 (61) + embedding + head + mtp on pp ranks [0]" in out.stdout
    assert "GiB" in out.stdout and "memory per rank (estimate, bf16 training):" in out.stdout


def test_prediction_with_a_gpu_profile():
    out = run("model=deepseek_v2_lite", "cluster=h100", "cluster.nodes=2", "parallel.pp=2", "parallel.ep=8",
              "train.dtype=bf16", "output=json")
    assert out.returncode == 0, out.stderr
    pred = json.loads(out.stdout)["prediction"]
    assert pred["hardware"] == "H100-SXM5-80GB" and pred["world_size"] == 16
    assert pred["step_s"] > pred["pipeline_s"] > 0
    text = run("model=deepseek_v2_lite", "cluster=h100", "cluster.nodes=2", "parallel.pp=2", "parallel.ep=8",
               "train.dtype=bf16").stdout
    assert "predicted step on 16 x H100-SXM5-80GB" in text and "GPU-hours per trillion tokens" in text


def test_search_flag_ranks_layouts_and_needs_a_profile():
    out = run("--search", "plan.top=3", "model=deepseek_v2_lite", "cluster=h100", "train.dtype=bf16",
              "train.global_batch_size=64", "plan.tp=[1]", "plan.pp=[1,2]", "plan.ep=[1,8]",
              "plan.recompute=[full]", "plan.fp8=[none]")
    assert out.returncode == 0, out.stderr
    assert "ranked by predicted tokens/s per GPU" in out.stdout and "1. bound by" in out.stdout
    out = run("--search")
    assert out.returncode == 2 and "cluster.gpu.bf16_tflops" in out.stderr and "cluster=h800" in out.stderr
    out = run("--search", "cluster=h100", "parallel.num_microbatches=null")
    assert out.returncode == 2 and "set train.global_batch_size" in out.stderr
