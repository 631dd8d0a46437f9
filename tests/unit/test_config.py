import pytest

from mtrain.config import Backend, ConfigError, Dtype, resolve_dtype
from mtrain.config.loading import load_config
from mtrain.train.preflight import check_config, config_errors


def errors_for(*overrides):
    return config_errors(load_config(list(overrides)))


def test_default_config_is_valid_and_composed():
    cfg = load_config()
    assert config_errors(cfg) == []
    assert cfg.model.name == "tiny" and cfg.parallel.schedule == "dualpipe"
    assert cfg.model.num_routed_experts >= 8 and cfg.model.n_group >= 2


def test_dtype_defaults_to_auto_bf16_on_nccl_fp32_on_gloo():
    assert load_config().train.dtype is Dtype.auto
    assert resolve_dtype(Dtype.auto, Backend.nccl) == resolve_dtype("auto", "nccl") == "bf16"
    assert resolve_dtype(Dtype.auto, Backend.gloo) == resolve_dtype("auto", "gloo") == "fp32"
    assert resolve_dtype("auto", "auto") == "bf16"  # planning without processes: a GPU cluster
    for explicit in ("fp32", "bf16"):
        assert {resolve_dtype(Dtype(explicit), backend) for backend in Backend} == {explicit}


def test_overrides_reach_the_tree():
    cfg = load_config(["parallel.pp=4", "parallel.schedule=dualpipev", "parallel.num_microbatches=8", "model.num_layers=8",
                       "cluster.gpus_per_node=8", "parallel.ep=1"])
    assert cfg.parallel.pp == 4 and cfg.parallel.schedule == "dualpipev"
    assert config_errors(cfg) == []


def test_schema_rejects_unknown_keys_and_bad_types():
    with pytest.raises(Exception, match="pipline"):
        load_config(["parallel.pipline=2"])
    with pytest.raises(Exception, match="tp"):
        load_config(["parallel.tp=two"])


def test_every_problem_is_reported_at_once():
    errors = errors_for("parallel.pp=3", "model.num_heads=5", "parallel.tp=2",
                        "parallel.schedule=dualpipe", "parallel.num_microbatches=5")
    text = "\n".join(errors)
    assert "parallel.tp * parallel.pp" in text  # world 4 vs tp*pp=6
    assert "even parallel.pp" in text
    assert "even parallel.num_microbatches" in text
    assert ">= 2*pp = 6" in text
    assert "model.num_heads=5" in text and "parallel.tp=2" in text
    assert len(errors) >= 4  # the two micro-batch rules share one message with one fix


def test_schedule_fixes_are_each_named_once_and_agree():
    errors = errors_for("parallel.pp=1")  # dualpipe, the default schedule
    assert errors == ["parallel.schedule=dualpipe needs an even parallel.pp (got pp=1): use pp=2, or "
                      "parallel.schedule=1f1b (pp=1 runs no pipeline)"]
    # Odd and too few at once: one fix that satisfies both (not "use 2" and "raise to 4").
    assert errors_for("parallel.num_microbatches=1") == [
        "parallel.schedule=dualpipe needs an even parallel.num_microbatches (half enter at each end) and "
        "parallel.num_microbatches >= 2*pp = 4 (got 1): use 4, or lower pp"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["parallel.ep=3", "model.num_routed_experts=9", "model.n_group=3", "parallel.pp=1",
          "parallel.schedule=1f1b"], "parallel.ep * parallel.expert_tp = 3*1 = 3 must divide"),
        (["parallel.ep=4", "cluster.gpus_per_node=8", "parallel.pp=1", "parallel.schedule=1f1b",
          "model.num_routed_experts=6", "model.n_group=2"], "model.num_routed_experts=6 is not divisible by parallel.ep=4"),
        (["parallel.schedule=dualpipev", "parallel.num_microbatches=3"], "dualpipev needs parallel.num_microbatches >= 2*pp = 4"),
        (["parallel.pp=4", "cluster.gpus_per_node=8", "parallel.schedule=dualpipev", "parallel.num_microbatches=8",
          "parallel.ep=1"], "model.num_layers=4 cannot be split over 8 pipeline stages"),
        (["parallel.pipeline_layout=[3,2]"], "summing to model.num_layers=4"),
        (["parallel.pipeline_layout=[4]"], "has 1 entries"),
        (["parallel.dp=4"], "parallel.dp=4"),
        (["model.topk_group=3"], "model.topk_group=3"),
        (["parallel.dispatcher=local"], "parallel.dispatcher=local works only with parallel.ep=1"),
        (["parallel.dispatch_hops=3"], "parallel.dispatch_hops=3 must be 1, 2 or null"),
        (["parallel.dispatch_hops=2", "parallel.dispatcher=deepep"], "parallel.dispatch_hops=2 is the alltoall"),
    ],
)
def test_rule(overrides, needle):
    errors = errors_for(*overrides)
    assert any(needle in e for e in errors), errors


@pytest.mark.parametrize(
    "override, needle",
    [
        ("parallel.schedule=gpipe", "parallel.schedule='gpipe' is not a valid choice; "
                                    "choose one of 1f1b, zb1p, dualpipe, dualpipev"),
        ("model.recompute=some", "model.recompute='some' is not a valid choice; choose one of none, selective, full"),
    ],
)
def test_bad_choice_is_rejected_when_loading(override, needle):
    # Choices are schema enums: a bad one never reaches config_errors.
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert info.value.errors == [needle]


def test_check_config_raises_with_all_errors():
    cfg = load_config(["parallel.pp=3", "model.num_heads=3", "parallel.tp=2"])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert len(info.value.errors) >= 3
    assert "model.num_heads" in str(info.value)


def test_deepep_is_refused_where_it_cannot_run():
    from mtrain.train.preflight import config_errors

    # A launched CPU run (gloo) trains in fp32, which DeepEP cannot send; ep=1 has nothing to exchange.
    assert config_errors(load_config(["parallel.dispatcher=deepep", "parallel.ep=2", "parallel.backend=gloo"]), 4) == [
        "parallel.dispatcher=deepep sends bf16 (its combine is bf16 only); train.dtype=fp32: set train.dtype=bf16 "
        "or parallel.dispatcher=alltoall"]
    errors = config_errors(load_config(["parallel.dispatcher=deepep", "parallel.ep=1", "train.dtype=bf16"]), 4)
    assert errors == ["parallel.dispatcher=deepep needs parallel.ep > 1 (with ep=1 nothing is exchanged: use auto)"]
    # Planned without processes, auto is taken to be GPUs in bf16.
    assert config_errors(load_config(["parallel.dispatcher=deepep", "parallel.ep=2"])) == []
