"""Converting Hugging Face DeepSeek checkpoints: round trips, FP8, fused experts,
problem reports, resuming, the config mapping, the initial weights of a run
and the ``mtrain-convert`` CLI."""
import json
import subprocess
import sys

import pytest
import torch

from tests.hf_models import load_mtrain, mtp_layer, mtp_tensors, random_model, read_tensors, save

pytest.importorskip("transformers")


def _import(hf_dir, out, **kw):
    from mtrain.train.hf_import import import_hf

    return import_hf(hf_dir, out, progress=False, **kw)


def _export(ckpt, out, **kw):
    from mtrain.train.hf_export import export_hf

    return export_hf(ckpt, out, progress=False, **kw)


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("interleave", [True, False])
def test_round_trip_is_bit_exact(tmp_path, interleave):
    """HF -> mtrain -> HF: every tensor (MTP module included) comes back with the
    same name, dtype and bits; bf16 with the router in fp32, as transformers keeps it."""
    hf = random_model(seed=5, rope_interleave=interleave).to(torch.bfloat16)
    for layer in hf.model.layers[1:]:
        layer.mlp.gate.float()
    source = save(hf, tmp_path / "hf", extra=mtp_tensors(hf, mtp_layer(hf).to(torch.bfloat16)))
    _import(source, tmp_path / "mtrain")
    out = _export(tmp_path / "mtrain", tmp_path / "back", max_shard_bytes=40_000)
    _assert_same_tensors(read_tensors(source), read_tensors(out))
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    config, original = (json.loads((d / "config.json").read_text()) for d in (out, source))
    for key in ("model_type", "num_hidden_layers", "n_group", "topk_group", "rope_interleave", "q_lora_rank",
                "num_nextn_predict_layers", "routed_scaling_factor", "first_k_dense_replace"):
        assert config[key] == original[key], key
    # transformers loads the export as it loads the source (the MTP layer is not part of its model).
    import transformers

    back, ref = (transformers.AutoModelForCausalLM.from_pretrained(d).eval() for d in (out, source))
    ids = torch.randint(0, hf.config.vocab_size, (1, 24))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_fused_experts_import_like_per_expert(tmp_path):
    """A checkpoint holding transformers 5's fused ``gate_up_proj``/``down_proj``
    converts to the same mtrain tensors as the per-expert one."""
    from safetensors.torch import save_file

    hf = random_model(seed=9)
    per_expert = save(hf, tmp_path / "hf")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((per_expert / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(fused / "model.safetensors"))
    assert any(k.endswith("experts.gate_up_proj") for k in read_tensors(fused))
    _import(per_expert, tmp_path / "a")
    _import(fused, tmp_path / "b")
    a, b = (dict(load_mtrain(tmp_path / d)[0].state_dict()) for d in ("a", "b"))
    _assert_same_tensors(a, b)
    # Exported per expert, as save_pretrained writes it.
    _assert_same_tensors(read_tensors(per_expert), read_tensors(_export(tmp_path / "b", tmp_path / "back")))


def _quantize(weight, block=(128, 128)):
    """FP8 e4m3 weight and per-block fp32 scale_inv, the hard way (one block at a time)."""
    rows, cols = weight.shape
    scale = torch.zeros(-(-rows // block[0]), -(-cols // block[1]))
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            scale[i, j] = tile.abs().max() / 448.0
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (tile / scale[i, j]).to(q.dtype)
    return q, scale


def _dequantize_by_blocks(q, scale, block=(128, 128)):
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def test_fp8_block_dequantization():
    from mtrain.model.hf_weights import dequantize_fp8

    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))  # ragged edge blocks both ways
    q, scale = _quantize(weight)
    reference = _dequantize_by_blocks(q, scale)
    assert torch.equal(dequantize_fp8(q, scale, dtype=torch.float32), reference)
    assert torch.equal(dequantize_fp8(q, scale), reference.to(torch.bfloat16))
    assert (reference - weight).abs().max() <= weight.abs().max() / 8  # e4m3: 3 mantissa bits
    q2, scale2 = _quantize(weight, (64, 32))
    assert torch.equal(dequantize_fp8(q2, scale2, (64, 32), torch.float32), _dequantize_by_blocks(q2, scale2, (64, 32)))
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_fp8(q, scale[:, :1])


def test_fp8_checkpoint_imports_dequantized(tmp_path):
    """Weights stored as float8_e4m3fn with ``weight_scale_inv`` (DeepSeek-V3's
    release format, blocks of 16 here) import as their dequantized values."""
    from safetensors.torch import save_file

    hf = random_model(seed=2)
    source = save(hf, tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (source / "config.json").write_text(json.dumps(config))
    names = ["model.layers.0.self_attn.q_b_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
             "model.layers.2.self_attn.kv_a_proj_with_mqa.weight"]
    index = json.loads((source / "model.safetensors.index.json").read_text())
    expected = {}
    for name in names:
        file = source / index["weight_map"][name]
        tensors = read_tensors_of(file)
        q, scale = _quantize(tensors[name], (16, 16))
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        save_file(tensors, str(file), metadata={"format": "pt"})
        index["weight_map"][name + "_scale_inv"] = index["weight_map"][name]
        expected[name] = _dequantize_by_blocks(q, scale, (16, 16)).to(torch.bfloat16)
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    _import(source, tmp_path / "mtrain")
    model, _ = load_mtrain(tmp_path / "mtrain")
    state = model.state_dict()
    from mtrain.train.checkpoint import stored_dtypes
    from mtrain.train.checkpoint_files import resolve_checkpoint

    dtypes = stored_dtypes(resolve_checkpoint(tmp_path / "mtrain"))
    assert dtypes["layers.0.attn.q_b.weight"] == torch.bfloat16 and dtypes["layers.0.attn.q_a.weight"] == torch.float32
    assert torch.equal(state["layers.0.attn.q_b.weight"], expected[names[0]].float())
    assert torch.equal(state["layers.1.mlp.experts.down"][3], expected[names[1]].float())
    assert torch.equal(state["layers.2.attn.kv_a.weight"], expected[names[2]].float())


def read_tensors_of(file):
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_every_problem_named_in_one_error(tmp_path, capsys):
    from safetensors.torch import save_file

    from mtrain.train.hf_import import HFCheckpointError

    source = save(random_model(seed=1), tmp_path / "hf", max_shard_size="10MB")
    file = source / "model.safetensors"
    tensors = read_tensors_of(file)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_b_proj.weight"] = tensors["model.layers.0.self_attn.q_b_proj.weight"][:-1]
    tensors["model.layers.2.mlp.bogus.weight"] = torch.zeros(3)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(
        torch.float8_e4m3fn)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError) as err:
        _import(source, tmp_path / "mtrain")
    problems = err.value.problems
    assert len(problems) == 4, problems
    text = str(err.value)
    for needle in ("missing: model.layers.1.mlp.experts.5.up_proj.weight",
                   "wrong shape: model.layers.0.self_attn.q_b_proj.weight is [95, 24], expected [96, 24]",
                   "unexpected: model.layers.2.mlp.bogus.weight",
                   "missing: model.layers.0.mlp.up_proj.weight_scale_inv"):
        assert needle in text
    assert not (tmp_path / "mtrain" / "step_000000.tmp").exists()  # nothing converted
    # The CLI says the same in one message, no traceback, exit status 2.
    from mtrain.cli.convert import main

    with pytest.raises(SystemExit) as exit_:
        main(["from-hf", str(source), str(tmp_path / "x")])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert "4 problem(s)" in stderr and "Traceback" not in stderr


def test_interrupted_conversion_resumes(tmp_path):
    """Stopped after its first shard, a rerun converts only the rest, and the
    checkpoint equals an uninterrupted conversion's."""
    source = save(random_model(seed=4), tmp_path / "hf")
    shards = len(list(source.glob("*.safetensors")))
    assert shards > 3

    def stop(index, file):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _import(source, tmp_path / "resumed", after_shard=stop)
    parts = tmp_path / "resumed" / "step_000000.tmp" / "parts"
    first = parts / "00000" / "DONE"
    assert [p.name for p in parts.iterdir()] == ["00000"] and first.is_file()
    stamp = first.stat().st_mtime_ns
    converted = []
    _import(source, tmp_path / "resumed", after_shard=lambda i, f: converted.append(i))
    assert converted == list(range(1, shards))
    assert (parts.parents[1] / "step_000000" / "parts" / "00000" / "DONE").stat().st_mtime_ns == stamp
    _import(source, tmp_path / "straight")
    a, b = (dict(load_mtrain(tmp_path / d)[0].state_dict()) for d in ("resumed", "straight"))
    _assert_same_tensors(a, b)
    again = []
    _import(source, tmp_path / "resumed", after_shard=lambda i, f: again.append(i))  # finished: nothing redone
    assert again == []


@pytest.mark.parametrize("model", ["tiny", "deepseek_v3", "deepseek_v2_lite"])
def test_config_json_round_trip(model):
    from mtrain.config.loading import load_config
    from mtrain.model.hf import hf_config_dict, model_fields

    cfg = load_config([f"model={model}"] + (["model.bias_update_speed=0"] if "v2" in model else [])).model
    fields = model_fields(json.loads(json.dumps(hf_config_dict(cfg))), name=cfg.name)
    for key, value in fields.items():
        assert str(value) == str(cfg[key]), key


def test_unsupported_config_lists_every_reason():
    from mtrain.model.hf import HFConfigError, hf_config_dict, model_fields
    from mtrain.config.loading import load_config

    config = hf_config_dict(load_config([]).model)
    config.update(hidden_act="gelu", tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0},
                  num_key_value_heads=1)
    with pytest.raises(HFConfigError) as err:
        model_fields(config)
    assert len(err.value.problems) == 4, err.value.problems


def test_initial_weights_fill_bf16_masters(tmp_path):
    """bf16 training keeps fp32 masters apart from the parameters: the initial
    weights go into the masters at full precision, the parameters get them
    rounded to bf16."""
    from mtrain.config.loading import load_config
    from mtrain.model.model import ModelChunk
    from mtrain.train.checkpoint import Checkpointer
    from mtrain.train.init_from import load_initial_weights
    from mtrain.train.optimizer import ZeroAdamW

    source = save(random_model(seed=6), tmp_path / "hf")
    _import(source, tmp_path / "mtrain", name="m")
    reference, model_cfg = load_mtrain(tmp_path / "mtrain")
    cfg = load_config([])
    model = ModelChunk(model_cfg, list(range(model_cfg.num_layers)))
    params = dict(model.named_parameters())
    for p in params.values():
        p.data = p.data.to(torch.bfloat16)
    optimizer = ZeroAdamW(params, None, cfg.train)
    load_initial_weights(tmp_path / "mtrain", Checkpointer(tmp_path / "run"), params, [model], optimizer,
                         model_cfg, tmp_path / "run")
    for name, expected in reference.state_dict().items():
        if name in params:
            assert torch.equal(optimizer.state[name]["master"], expected), name
            assert torch.equal(params[name], expected.to(torch.bfloat16)), name
        else:
            assert torch.equal(dict(model.named_buffers())[name], expected), name
    # A run whose model config differs in what the weights compute is refused, naming the field.
    from mtrain.config.validate import ConfigError

    other = model_cfg.copy()
    other.rope_theta = 5000.0
    with pytest.raises(ConfigError, match="model.rope_theta=5000.0"):
        load_initial_weights(tmp_path / "mtrain", Checkpointer(tmp_path / "run"), params, [model], optimizer,
                             other, tmp_path / "run")


def test_cli_converts_a_save_pretrained_checkpoint(tmp_path, capsys):
    """One real command (a subprocess), the others through ``main``."""
    from mtrain.cli.convert import main

    source = save(random_model(seed=8), tmp_path / "hf")
    run = subprocess.run([sys.executable, "-m", "mtrain.cli.convert", "from-hf", str(source), str(tmp_path / "ckpt"),
                          "--name", "tiny_hf", "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ckpt = tmp_path / "ckpt"
    assert f"mtrain.cli.train -cd {ckpt} model=tiny_hf checkpoint.init_from={ckpt}" in run.stdout
    main(["config", str(source), "--name", "tiny_hf"])
    printed = capsys.readouterr().out
    assert "name: tiny_hf" in printed and "num_routed_experts: 8" in printed
    assert (tmp_path / "ckpt" / "model" / "tiny_hf.yaml").read_text().endswith(printed.split("\n", 1)[1])
    main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--max-shard-size", "50KB", "--no-progress"])
    _assert_same_tensors(read_tensors(source), read_tensors(tmp_path / "back"))
