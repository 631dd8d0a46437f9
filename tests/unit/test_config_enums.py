"""Choice fields are enums in the schema that read and write as plain names,
and ``mtrain.config`` stays the lowest layer."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import mtrain.config
from mtrain.config import Choice, Config, ConfigError, Dtype, Schedule
from mtrain.config.loading import load_config, override_errors
from mtrain.config.validate import choice_fields
from mtrain.train.preflight import config_errors


def test_override_and_yaml_strings_become_enums_that_write_back_plain(tmp_path):
    cfg = load_config(["parallel.schedule=1f1b", "parallel.pp=1", "train.dtype=bf16"])
    assert cfg.parallel.schedule is Schedule["1f1b"] and cfg.train.dtype is Dtype.bf16
    assert load_config(["parallel=single"]).parallel.schedule is Schedule["1f1b"]  # from YAML
    # Usable wherever the plain string is.
    s = cfg.parallel.schedule
    assert s == "1f1b" and s in ("1f1b", "zb1p") and {"1f1b": 1}[s] == 1
    assert (str(s), f"{s}", f"{s:>5}", "%s" % s) == ("1f1b", "1f1b", " 1f1b", "1f1b")
    assert "-1f1b-" in cfg.run_dir  # interpolated into a string
    assert json.dumps({"s": s}) == '{"s": "1f1b"}'
    assert json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))["train"]["dtype"] == "bf16"
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)
    text = (tmp_path / "config.yaml").read_text()
    assert "  schedule: 1f1b\n" in text and "  dtype: bf16\n" in text and "Schedule" not in text
    # The written file merges back onto the schema as the same enums.
    again = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(tmp_path / "config.yaml"))
    assert again.parallel.schedule is Schedule["1f1b"] and again.train.dtype is Dtype.bf16


def test_every_choice_is_named_by_its_value():
    for key, enum in choice_fields().items():
        assert issubclass(enum, Choice), key
        assert [m.name for m in enum] == list(enum.values()), key
    with pytest.raises(ValueError, match="must have the value"):
        class Bad(Choice):
            a = "b"


def test_schema_choices_match_the_packages_that_use_them():
    from mtrain.model.moe.gemm_backends import KINDS
    from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES
    from mtrain.train.grads import REDUCE_DTYPES
    from mtrain.train.lr import LR_SCHEDULES
    from mtrain.train.reporting import WANDB_MODES

    fields = choice_fields()
    assert fields["parallel.schedule"].values() == SCHEDULE_NAMES
    assert fields["model.grouped_gemm"].values() == KINDS
    assert fields["train.lr_schedule"].values() == LR_SCHEDULES
    assert fields["logging.wandb_mode"].values() == WANDB_MODES
    assert fields["parallel.grad_reduce_dtype"].values() == REDUCE_DTYPES


def test_bad_choice_names_the_field_the_value_and_the_choices():
    assert override_errors(["+train.dtype=fp16", "parallel.schedule=1f1b,gpipe", "parallel.backend=1",
                            "--cfg", "job", "model=small", "parallel.schedule=${x}"]) == [
        "train.dtype='fp16' is not a valid choice; choose one of auto, fp32, bf16",
        "parallel.schedule='gpipe' is not a valid choice; choose one of 1f1b, zb1p, dualpipe, dualpipev",
        "parallel.backend=1 is not a valid choice; choose one of auto, gloo, nccl",
    ]


def test_grad_reduce_dtype_is_fp32_or_bf16_and_fp16_is_one_clear_error():
    from mtrain.config.schema import GradReduceDtype

    assert load_config().parallel.grad_reduce_dtype is GradReduceDtype.fp32  # the default
    assert load_config(["parallel.grad_reduce_dtype=bf16"]).parallel.grad_reduce_dtype is GradReduceDtype.bf16
    message = "parallel.grad_reduce_dtype='fp16' is not a valid choice; choose one of fp32, bf16"
    assert override_errors(["parallel.grad_reduce_dtype=fp16"]) == [message]
    with pytest.raises(ConfigError) as info:
        load_config(["parallel.grad_reduce_dtype=fp16"])
    assert info.value.errors == [message]
    # A Config built in code bypasses OmegaConf's enum check; the rule still fires once.
    cfg = OmegaConf.to_object(load_config())
    cfg.parallel.grad_reduce_dtype = "fp16"
    assert config_errors(cfg) == [message]


def test_train_cli_reports_a_bad_choice_once_and_exits_2():
    out = subprocess.run([sys.executable, "-m", "mtrain.cli.train", "parallel.dispatcher=nvlink"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("invalid config:\n  - parallel.dispatcher='nvlink' is not a valid choice; "
                                  "choose one of auto, local, alltoall, deepep")


def test_lr_schedule_is_reported_once():
    with pytest.raises(ConfigError) as info:
        load_config(["train.lr_schedule=linear"])
    assert len(info.value.errors) == 1
    # A Config object bypasses OmegaConf's enum check; the rule still fires once.
    cfg = OmegaConf.to_object(load_config())
    cfg.train.lr_schedule = "linear"
    errors = config_errors(cfg)
    assert len(errors) == 1 and "train.lr_schedule='linear'" in errors[0], errors


def test_config_imports_nothing_from_other_mtrain_packages():
    for path in Path(mtrain.config.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
                names = [node.module or ""]
            for name in names:
                inside = name == "mtrain.config" or name.startswith("mtrain.config.")
                assert inside or not (name == "mtrain" or name.startswith("mtrain.")), f"{path.name}: {name}"


def test_a_config_built_in_code_gets_every_bad_choice_reported():
    # Without OmegaConf's enum conversion nothing else would stop these.
    cfg = OmegaConf.to_object(load_config())
    cfg.model.recompute, cfg.train.dtype = "fulll", "bf17"
    cfg.parallel.dispatcher, cfg.logging.wandb_mode = "x", "nope"
    errors = config_errors(cfg)
    for key, value in (("model.recompute", "fulll"), ("train.dtype", "bf17"), ("parallel.dispatcher", "x"),
                       ("logging.wandb_mode", "nope")):
        assert sum(f"{key}={value!r} is not a valid choice" in e for e in errors) == 1, (key, errors)
    assert len(errors) == 4, errors


def test_a_key_outside_the_schema_is_refused_with_the_nearest_field():
    """Hydra would take ``+train.step=10`` and nothing would read it."""
    errors = override_errors(["+train.step=10", "model.num_layer=3", "++train.steps=5", "model=small",
                              "+hydra.job.env_set.X=1", "~train.seed"])
    assert errors == [
        "train.step: train has no field 'step' (did you mean train.steps?); a key outside the schema "
        "(mtrain/config/schema.py) would be ignored",
        "model.num_layer: model has no field 'num_layer' (did you mean model.num_layers?); a key outside the "
        "schema (mtrain/config/schema.py) would be ignored",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(["+train.step=10"])
    assert len(info.value.errors) == 1 and "train.steps" in info.value.errors[0]
