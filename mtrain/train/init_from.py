"""Start a run from existing weights (``checkpoint.init_from``).

The source is a Hugging Face DeepSeek-V2/V3 directory or an mtrain checkpoint
(a ``step_N`` directory or a checkpoint root). A Hugging Face directory is
converted first, by rank 0, into ``<run_dir>/hf_import`` (resumable, done
once; :mod:`mtrain.train.hf_import`) while the other ranks wait. Then every
rank loads the model weights for its own layout through the checkpointer:
the weights, and the routers' expert biases, into the parameters, or into the
fp32 master copies where the optimizer keeps them (bf16 training), which are
then copied to the parameters. The optimizer's moments and step, the data
position and the step count are not loaded: the run starts at step 0.

The model config must describe the source: when a model config lies beside
it (``model/<name>.yaml`` of a conversion, a run's ``config.yaml``) every
field that changes what the weights compute is compared with the run's and a
difference is refused, naming the field.
"""
from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from mtrain.config.validate import ConfigError
from mtrain.model.params import meta
from mtrain.train.checkpoint_files import resolve_checkpoint
from mtrain.train.hf_export import find_model_config

log = logging.getLogger(__name__)

HF_IMPORT_DIR = "hf_import"
# Model fields that do not change what the weights compute (training settings, sizes of what is not stored).
_NOT_COMPARED = ("name", "bias_update_speed", "aux_loss_alpha", "mtp_depth", "mtp_loss_weight", "max_seq_len",
                 "init_std", "grouped_gemm", "recompute", "compile")
# Converting a large model takes a while; the ranks that wait for it get this long.
CONVERSION_TIMEOUT = datetime.timedelta(hours=12)


def is_hf_directory(path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


class InitialWeights:
    """The weights this rank holds, as a sharded ``Stateful``: each
    parameter's fp32 master where the optimizer keeps one apart from the
    parameter (loaded there, then copied to the parameter), else the
    parameter; and the routers' ``expert_bias`` buffers."""

    def __init__(self, params: Mapping[str, nn.Parameter], chunks: Iterable[nn.Module], optimizer):
        self.params = dict(params)
        self.masters = {n: s["master"] for n, s in optimizer.state.items()
                        if s["master"].data_ptr() != self.params[n].data_ptr()}
        self.tensors = {n: self.masters.get(n, p) for n, p in self.params.items()}
        for chunk in chunks:
            for name, buf in chunk.named_buffers():
                if name.endswith("expert_bias"):
                    self.tensors.setdefault(name, buf)
        self.metas = {n: meta(p) for n, p in self.params.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                if state[name] is not tensor:
                    tensor.copy_(state[name])
            for name, master in self.masters.items():
                self.params[name].copy_(master)


def _after_rank0(work, what: str):
    """Run ``work`` on rank 0 (all ranks when torch.distributed is not
    initialised); every rank returns its result or raises its failure."""
    if not dist.is_initialized():
        return work()
    group = dist.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = work()
        except Exception as e:  # reported on every rank
            box[1] = f"{what} failed: {e}"
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    if box[1]:
        raise RuntimeError(box[1])
    return box[0]


def source_checkpoint(source, work_dir, model_name: str) -> Path:
    """The mtrain checkpoint to start from: ``source`` itself, or the
    conversion of the Hugging Face directory ``source`` under ``work_dir``."""
    if is_hf_directory(source):
        from mtrain.train.hf_import import import_hf

        target = Path(work_dir) / HF_IMPORT_DIR
        return Path(_after_rank0(lambda: import_hf(source, target, name=model_name),
                                 f"converting the Hugging Face checkpoint {source}"))
    if not Path(source).exists():
        raise FileNotFoundError(f"checkpoint.init_from={source}: no such directory")
    return resolve_checkpoint(source)


def model_differences(saved, model_cfg) -> list[str]:
    """Fields of ``model_cfg`` that differ from ``saved`` and change what the weights compute."""
    out = []
    for key in saved:
        if key in _NOT_COMPARED or key not in model_cfg:
            continue
        if str(saved[key]) != str(model_cfg[key]):
            out.append(f"model.{key}={model_cfg[key]} but the weights were made with {saved[key]}")
    return out


def load_initial_weights(source, checkpointer, params, chunks, optimizer, model_cfg, work_dir) -> Path:
    """Load the model weights of ``source`` into this rank's ``params`` (and
    the optimizer's fp32 masters); collective over all ranks. Returns the
    checkpoint loaded."""
    path = source_checkpoint(source, work_dir, str(model_cfg.name))
    saved = find_model_config(path)
    differences = model_differences(saved, model_cfg) if saved is not None else []
    if differences:
        where = path.parent / "model" if (path.parent / "model").is_dir() else path.parent.parent / "config.yaml"
        raise ConfigError([f"checkpoint.init_from={source}: {d}" for d in differences]
                          + [f"use the model config of the weights ({where}; docs/hf.md)"])
    weights = InitialWeights(params, chunks, optimizer)
    checkpointer.load(path, {"model": weights}, metas=weights.metas)
    log.info("initial weights from %s (step 0, fresh optimizer)", path)
    return path
