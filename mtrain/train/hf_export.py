"""An mtrain checkpoint -> a Hugging Face DeepSeek-V2/V3 model directory.

``export_hf(checkpoint, out)`` writes ``config.json``, safetensors shards
``model-0000i-of-0000n.safetensors`` with per-expert tensor names (as the
Hub's checkpoints and ``save_pretrained``) and ``model.safetensors.index.json``;
``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it. Tensors
keep the dtype they are stored in unless ``dtype`` says otherwise, so a
Hugging Face checkpoint imported and exported again is bit for bit the same.

The model config comes from ``model`` or is found beside the checkpoint
(``<root>/model/<name>.yaml`` written by the import, or the run's
``config.yaml`` above ``<run_dir>/checkpoints``). The layout (V2 or V3,
``rope_interleave``), the other keys of ``config.json`` and the tokenizer
files come from ``like`` (a Hugging Face directory or an import's root) or
the checkpoint's own root when it was imported, else the layout follows the
router settings (sigmoid: V3, softmax: V2). Memory: the checkpoint is read
about one output shard at a time.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mtrain.config.schema import ModelConfig
from mtrain.model.hf import HFConfigError, HFLayout, hf_config_dict, hf_layout, hf_model_type
from mtrain.model.hf_weights import mtrain_shapes, to_hf
from mtrain.train.checkpoint_files import resolve_checkpoint, write_atomic
from mtrain.train.hf_import import DTYPES, FILES_DIR, HFCheckpointError, other_files, quiet_dcp

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def find_model_config(step: Path):
    """The model config saved beside checkpoint ``step``, or None."""
    root = step.parent
    yamls = sorted((root / "model").glob("*.yaml"))
    if len(yamls) == 1:
        return load_model_config(yamls[0])
    if (root.parent / "config.yaml").is_file():  # <run_dir>/checkpoints/step_N and <run_dir>/config.yaml
        return load_model_config(root.parent / "config.yaml")
    return None


def load_model_config(path):
    """A ``model`` config from a model yaml or a run's full ``config.yaml``."""
    loaded = OmegaConf.load(path)
    if "model" in loaded:
        loaded = loaded.model
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)


def _reference(root: Path):
    """(config.json dict or None, other files to copy) of a conversion root or a Hugging Face directory."""
    if (root / "hf_config.json").is_file():
        return json.loads((root / "hf_config.json").read_text()), sorted((root / FILES_DIR).glob("*"))
    if (root / "config.json").is_file():
        return json.loads((root / "config.json").read_text()), other_files(root)
    return None, []


class _ShardWriter:
    """Collects tensors into safetensors shards of at most ``max_bytes`` (a
    bigger tensor gets a shard of its own), named ``-of-n`` at the end."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buffer, self.size, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        file = self.out / f"model-{len(self.files) + 1:05d}.safetensors.partial"
        save_file(self.buffer, str(file), metadata={"format": "pt"})
        self.files.append(file)
        self.weight_map.update({n: file for n in self.buffer})
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        names = {}
        for i, file in enumerate(self.files):
            final = self.out / f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            file.rename(final)
            names[file] = final.name
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {n: names[f] for n, f in sorted(self.weight_map.items())}}
        write_atomic(self.out / INDEX, json.dumps(index, indent=2))


def export_hf(checkpoint, out, *, model=None, like=None, dtype: str = "auto", max_shard_bytes: int = 5 << 30,
              progress: bool = True) -> Path:
    """Write the Hugging Face model directory ``out`` from mtrain checkpoint
    ``checkpoint`` (see the module doc). ``model``: a model config, or the
    path of a model yaml or run config.yaml. ``like``: a Hugging Face
    directory or a conversion root (``mtrain-convert from-hf`` output) whose
    config.json keys, layout and tokenizer files to reuse (default: the
    checkpoint's own root). ``dtype``: ``auto`` (as stored), ``bf16`` or
    ``fp32`` (expert biases stay fp32)."""
    from tqdm import tqdm

    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype={dtype!r}: choose auto, bf16 or fp32")
    step = resolve_checkpoint(checkpoint)
    cfg = load_model_config(model) if isinstance(model, (str, Path)) else model
    cfg = cfg if cfg is not None else find_model_config(step)
    if cfg is None:
        raise FileNotFoundError(f"{step}: no model config beside it ({step.parent}/model/*.yaml or "
                                f"{step.parent.parent}/config.yaml); pass one")
    base, files = _reference(Path(like) if like is not None else step.parent)
    try:
        model_type = hf_model_type(cfg)
    except HFConfigError as e:
        raise HFCheckpointError(step, e.problems) from None
    layout = hf_layout(base) if base and base.get("model_type") == model_type else HFLayout(model_type)
    shapes = mtrain_shapes(cfg)
    stored = dcp.FileSystemReader(step).read_metadata().state_dict_metadata
    problems = [f"missing: {n} {list(s)}" for n, s in shapes.items() if n not in stored]
    problems += [f"wrong shape: {n} is {list(stored[n].size)}, the model config says {list(s)}"
                 for n, s in shapes.items() if n in stored and tuple(stored[n].size) != s]
    if model_type == "deepseek_v2" and cfg.mtp_depth:
        problems.append(f"model.mtp_depth={cfg.mtp_depth}: DeepSeek-V2 checkpoints (softmax routers) hold no MTP")
    if problems:
        raise HFCheckpointError(step, problems)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model-*.safetensors*"), out / INDEX]:
        old.unlink(missing_ok=True)
    cast = DTYPES.get(dtype)
    writer = _ShardWriter(out, max_shard_bytes)
    names = list(shapes)
    bar = tqdm(total=len(names), desc="exporting tensors", unit="tensor", disable=not progress)
    while names:
        batch, size = [], 0
        while names and (not batch or size < max_shard_bytes):
            entry: TensorStorageMetadata = stored[names[0]]
            batch.append(names.pop(0))
            size += entry.size.numel() * entry.properties.dtype.itemsize
        state = {n: torch.empty(shapes[n], dtype=stored[n].properties.dtype) for n in batch}
        with quiet_dcp():
            dcp.load(state, checkpoint_id=step, no_dist=True)
        for name in batch:
            tensor = state.pop(name)
            if name.endswith("expert_bias") and layout.model_type == "deepseek_v2" and tensor.any():
                log.warning("%s is not zero but DeepSeek-V2 routers have no bias: dropped (expert selection "
                            "changes)", name)
            if cast is not None:
                tensor = tensor.float() if name.endswith("expert_bias") else tensor.to(cast)
            for hf_name, t in to_hf(name, tensor, cfg, layout):
                writer.add(hf_name, t)
            bar.update(1)
    bar.close()
    writer.close()
    config = hf_config_dict(cfg, layout, base)
    config["dtype"] = _DTYPE_NAMES.get(cast or stored["head.weight"].properties.dtype, "float32")
    write_atomic(out / "config.json", json.dumps(config, indent=2, sort_keys=True))
    for extra in files:
        shutil.copy2(extra, out / extra.name)
    log.info("wrote %s: %d shards", out, len(writer.files))
    return out
