"""A Hugging Face DeepSeek-V2/V3 checkpoint -> an mtrain checkpoint.

``import_hf(hf_dir, out)`` writes ``out/step_000000`` (format 2, logical full
tensors under global parameter names, sealed and named in ``out/latest`` like
any checkpoint the trainer saves), the model config as
``out/model/<name>.yaml`` and the source's ``config.json`` as
``out/hf_config.json`` (export reads it back). Any layout loads the result
(``checkpoint.init_from=out``).

- **One error for every problem.** Before anything is written, the tensor
  headers of every shard are compared with what the model config needs
  (:func:`mtrain.model.hf_weights.import_plan`); every missing, unexpected or
  mis-shaped tensor (and FP8 weight without a fitting scale) is listed in one
  :class:`HFCheckpointError`.
- **Streaming.** Shards are converted one at a time (memory about one shard):
  each becomes a DCP part under ``step_000000.tmp/parts/<n>/``; a stacked
  expert tensor is stored as one DCP chunk per expert, so no layer's experts
  are ever assembled. The parts' metadata are then merged into the
  checkpoint's ``.metadata``.
- **Resumable.** A part is done once its ``DONE`` marker is written; a rerun
  with the same source and dtype skips done parts (a different dtype starts
  over), and a finished conversion is not redone.
- **FP8** weights are dequantized block by block (``weight_scale_inv``) to bf16,
  or to ``dtype``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.storage import WriteResult

from mtrain.config.schema import ModelConfig
from mtrain.model.hf import HFConfigError, HFLayout, hf_layout, model_fields
from mtrain.model.hf_weights import (FP8_DTYPES, SCALE_SUFFIX, dequantize_fp8, from_hf, import_plan,
                                     mtp_layer_names, mtrain_shapes, scale_shape)
from mtrain.train.checkpoint import EXTRA_DIR
from mtrain.train.checkpoint_files import MARKER, finalize, step_dir, tmp_dir, verify_checkpoint, write_atomic

log = logging.getLogger(__name__)

DONE = "DONE"
FILES_DIR = "hf_files"  # the source's other files (tokenizer, generation config, license), for the export
SETTINGS = "convert.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn}


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint mtrain cannot convert; ``problems`` lists every reason."""

    def __init__(self, source, problems: list[str]):
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) converting this checkpoint:\n{shown}")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. "BF16", "F8_E4M3"


class HFDirectory:
    """A Hugging Face model directory: ``config.json`` and safetensors shards
    (those ``model.safetensors.index.json`` names, else every ``*.safetensors``).
    Only headers are read until a tensor is asked for."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path, self.problems = Path(path), []
        if not (self.path / "config.json").is_file():
            raise HFCheckpointError(self.path, ["no config.json: not a Hugging Face model directory"])
        self.config = json.loads((self.path / "config.json").read_text())
        index = self.path / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
        self.files = sorted(set(weight_map.values())) if weight_map else sorted(
            p.name for p in self.path.glob("*.safetensors"))
        if not self.files:
            raise HFCheckpointError(self.path, ["no *.safetensors files"])
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            if not (self.path / file).is_file():
                self.problems.append(f"{file}: named in model.safetensors.index.json but not found")
                continue
            with safe_open(self.path / file, "pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    if name in self.tensors:
                        self.problems.append(f"{name}: stored in both {self.tensors[name].file} and {file}")
                    self.tensors[name] = TensorInfo(file, tuple(part.get_shape()), part.get_dtype())
        for name, file in (weight_map or {}).items():
            if name not in self.tensors and (self.path / file).is_file():
                self.problems.append(f"{name}: model.safetensors.index.json puts it in {file}, which lacks it")
        self._open: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def names_in(self, file: str) -> list[str]:
        return sorted(n for n, info in self.tensors.items() if info.file == file)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.tensors[name].file
        if file not in self._open:
            if len(self._open) >= 4:  # a shard and the few its FP8 scales may sit in
                self.close()
            self._open[file] = self._stack.enter_context(safe_open(self.path / file, "pt"))
        return self._open[file].get_tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._open, self._stack = {}, contextlib.ExitStack()

    def weights(self, layout: HFLayout) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor but FP8 scales; a problem is recorded
        for an unsupported dtype, an FP8 weight without a fitting scale and a
        scale without an FP8 weight."""
        out = {}
        for name, info in self.tensors.items():
            base = name[: -len(SCALE_SUFFIX)]
            if name.endswith(SCALE_SUFFIX) and base in self.tensors and self.tensors[base].dtype == "F8_E4M3":
                continue  # checked with its weight
            if name.endswith(SCALE_SUFFIX):
                self.problems.append(f"unexpected: {name} (no FP8 weight {base} to scale)")
                continue
            if info.dtype not in _SAFETENSORS_DTYPES:
                self.problems.append(f"{name}: dtype {info.dtype} is not supported (F32, F16, BF16, F8_E4M3)")
            elif info.dtype == "F8_E4M3":
                scale = self.tensors.get(name + SCALE_SUFFIX)
                expected = scale_shape(info.shape, layout.fp8_block) if len(info.shape) == 2 else None
                if expected is None:
                    self.problems.append(f"{name}: an FP8 tensor of shape {list(info.shape)}; only 2-D weights "
                                         f"are block-scaled")
                elif scale is None:
                    self.problems.append(f"missing: {name}{SCALE_SUFFIX} (the block scales of FP8 weight {name})")
                elif scale.shape != expected:
                    self.problems.append(f"wrong shape: {name}{SCALE_SUFFIX} is {list(scale.shape)}, expected "
                                         f"{list(expected)} ({layout.fp8_block[0]}x{layout.fp8_block[1]} blocks "
                                         f"of {list(info.shape)})")
            out[name] = info.shape
        return out

    def load(self, name: str, layout: HFLayout, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """Tensor ``name``, FP8 dequantized (to ``dtype`` or bf16), else cast to ``dtype`` when given."""
        tensor = self.read(name)
        if tensor.dtype in FP8_DTYPES:
            return dequantize_fp8(tensor, self.read(name + SCALE_SUFFIX), layout.fp8_block, dtype or torch.bfloat16)
        return tensor if dtype is None else tensor.to(dtype)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def model_config(fields: dict):
    """A checked ``ModelConfig`` (OmegaConf) from :func:`model_fields` output."""
    return OmegaConf.structured(ModelConfig(**fields))


def model_yaml(cfg, source) -> str:
    return f"# Converted from the Hugging Face checkpoint {source} by mtrain-convert.\n" + OmegaConf.to_yaml(cfg)


@contextlib.contextmanager
def quiet_dcp():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def plan_import(src: HFDirectory, name: str):
    """(model config, layout, import plan) for ``src``; raises :class:`HFCheckpointError`
    listing every problem of the config and the tensors."""
    try:
        fields = model_fields(src.config, name)
    except HFConfigError as e:
        raise HFCheckpointError(src.path / "config.json", e.problems) from None
    layout = hf_layout(src.config)
    available = src.weights(layout)
    if fields["mtp_depth"] and not mtp_layer_names(available, model_config(fields)):
        log.warning("%s: config.json declares %d MTP module(s) but no MTP weights are stored: converting "
                    "without MTP (model.mtp_depth=0)", src.path, fields["mtp_depth"])
        fields["mtp_depth"] = 0
    cfg = model_config(fields)
    plan, problems = import_plan(cfg, layout, available)
    problems = src.problems + problems
    if problems:
        raise HFCheckpointError(src.path, problems)
    return cfg, layout, plan


def import_hf(hf_dir, out, *, name: Optional[str] = None, dtype: str = "auto", progress: bool = True,
              after_shard: Optional[Callable[[int, str], None]] = None) -> Path:
    """Convert the Hugging Face checkpoint ``hf_dir`` into an mtrain checkpoint
    under ``out`` (see the module doc); return the checkpoint directory.
    ``dtype``: ``auto`` keeps each tensor's dtype (FP8 becomes bf16), ``bf16``
    or ``fp32`` casts every tensor (expert biases stay fp32). ``after_shard``
    is called with the index and name of each shard once its part is done."""
    from tqdm import tqdm

    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype={dtype!r}: choose auto, bf16 or fp32")
    out = Path(out)
    src = HFDirectory(hf_dir)
    cfg, layout, plan = plan_import(src, name or out.name)
    (out / "model").mkdir(parents=True, exist_ok=True)
    for old in (out / "model").glob("*.yaml"):  # one model config per conversion (a rerun may rename it)
        if old.name != f"{cfg.name}.yaml":
            old.unlink()
    write_atomic(out / "model" / f"{cfg.name}.yaml", model_yaml(cfg, src.path))
    write_atomic(out / "hf_config.json", json.dumps(src.config, indent=2, sort_keys=True))
    _copy_other_files(src.path, out / FILES_DIR)
    final = step_dir(out, 0)
    if (final / MARKER).is_file():
        verify_checkpoint(final, checksums=False)
        log.info("%s already holds the converted checkpoint (delete it to convert again)", final)
        return final
    tmp = tmp_dir(out, 0)
    settings = {"source": str(src.path.resolve()), "dtype": dtype, "files": src.files}
    if (tmp / SETTINGS).is_file() and json.loads((tmp / SETTINGS).read_text()) != settings:
        log.warning("%s holds a conversion with other settings: starting over", tmp)
        shutil.rmtree(tmp)
    (tmp / "parts").mkdir(parents=True, exist_ok=True)
    write_atomic(tmp / SETTINGS, json.dumps(settings))
    cast = DTYPES.get(dtype)
    shapes = mtrain_shapes(cfg)
    try:
        for index, file in enumerate(tqdm(src.files, desc="converting shards", unit="shard", disable=not progress)):
            part = tmp / "parts" / f"{index:05d}"
            if _part_done(part, src.path / file):
                continue
            _convert_shard(src, file, part, plan, cfg, layout, cast)
            if after_shard is not None:
                after_shard(index, file)
    finally:
        src.close()
    _write_absent(tmp / "parts" / "absent", plan.absent, shapes)
    _check_copies(tmp / "parts", plan.copies)
    _merge_parts(tmp, shapes)
    (tmp / EXTRA_DIR).mkdir(exist_ok=True)
    torch.save({}, tmp / EXTRA_DIR / "rank_00000.pt")  # no per-rank state: weights only
    return finalize(out, 0, world_size=1, keep_last=0)


def other_files(source: Path, limit: int = 64 << 20) -> list[Path]:
    """A Hugging Face directory's tokenizer, generation config, license and the
    like: small files that are neither weights, their index, the config nor code."""
    return [file for file in sorted(source.iterdir())
            if file.is_file() and not file.name.startswith(".") and file.suffix not in (".safetensors", ".py", ".bin")
            and file.name not in ("config.json", "model.safetensors.index.json") and file.stat().st_size <= limit]


def _copy_other_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for file in other_files(source):
        shutil.copy2(file, target / file.name)


def _part_done(part: Path, file: Path) -> bool:
    marker = part / DONE
    return marker.is_file() and json.loads(marker.read_text()).get("size") == file.stat().st_size


def _save_part(part: Path, state: dict, pieces: dict, extra: dict) -> None:
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    if state:
        with quiet_dcp():
            dcp.save(state, checkpoint_id=part, no_dist=True)
    write_atomic(part / DONE, json.dumps({"pieces": pieces, **extra}))


def _convert_shard(src: HFDirectory, file: str, part: Path, plan, cfg, layout: HFLayout, cast) -> None:
    copied = set(plan.copies) | set(plan.copies.values())
    state, pieces, digests = {}, {}, {}
    for hf_name in src.names_in(file):
        if hf_name not in plan.targets:
            continue  # an FP8 scale, read with its weight, or an ignored tensor
        tensor = src.load(hf_name, layout, cast)
        if hf_name in copied:
            digests[hf_name] = _digest(tensor)
        for name, link in plan.targets[hf_name]:
            piece = from_hf(link, name, tensor, cfg)
            if piece is None:
                continue
            value = piece.tensor
            if cast is not None and name.endswith("expert_bias"):
                value = value.float()
            key = name if piece.expert is None else f"{name}@{piece.expert}"
            state[key] = value if piece.expert is None else value.unsqueeze(0)
            pieces[key] = [name, piece.expert]
    _save_part(part, state, pieces, {"file": file, "size": (src.path / file).stat().st_size, "digests": digests})


def _write_absent(part: Path, names: list[str], shapes) -> None:
    """Tensors no HF tensor holds (V2's expert biases) start at zero."""
    _save_part(part, {n: torch.zeros(shapes[n]) for n in names}, {n: [n, None] for n in names}, {})


def _check_copies(parts: Path, copies: dict[str, str]) -> None:
    digests = {}
    for marker in parts.glob(f"*/{DONE}"):
        digests.update(json.loads(marker.read_text()).get("digests", {}))
    differ = sorted(c for c, main in copies.items() if digests.get(c) != digests.get(main))
    if differ:
        log.warning("the MTP copies %s differ from the main embedding/head they should equal; mtrain shares one "
                    "embedding and one head, the main model's is kept", ", ".join(differ))


def _merge_parts(tmp: Path, shapes: dict) -> None:
    """One ``.metadata`` for the parts' tensors: every piece a chunk of its
    logical tensor, its bytes where its part's DCP save put them."""
    entries: dict[str, TensorStorageMetadata] = {}
    results = []
    for part in sorted(p.parent for p in (tmp / "parts").glob(f"*/{DONE}")):
        pieces = json.loads((part / DONE).read_text())["pieces"]
        if not pieces:
            continue
        stored = dcp.FileSystemReader(part).read_metadata()
        for index, info in stored.storage_data.items():
            name, expert = pieces[index.fqn]
            item = stored.state_dict_metadata[index.fqn]
            offset = torch.Size([expert] + [0] * (len(shapes[name]) - 1)) if expert is not None else index.offset
            entry = entries.setdefault(name, TensorStorageMetadata(item.properties, torch.Size(shapes[name]), []))
            entry.chunks.append(ChunkStorageMetadata(offset, item.size))
            where = f"parts/{part.name}/{info.relative_path}"
            results.append(WriteResult(MetadataIndex(name, offset), info.length,
                                       dataclasses.replace(info, relative_path=where)))
    problems = [f"{n}: no data" for n in shapes if n not in entries]
    for name, entry in entries.items():
        covered = sum(math.prod(c.sizes) for c in entry.chunks)
        if covered != math.prod(entry.size):
            problems.append(f"{name}: chunks cover {covered} of {math.prod(entry.size)} elements")
    if problems:
        raise RuntimeError(f"{tmp}: the converted parts do not make the model: {problems}")
    writer = dcp.FileSystemWriter(tmp)
    writer.set_up_storage_writer(True)
    writer.finish(Metadata(state_dict_metadata=entries), [results])

