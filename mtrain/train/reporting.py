"""Where step metrics go: metrics.jsonl, the console, wandb, TensorBoard.

Only the logging rank (global rank 0) writes anything; on other ranks a
:class:`Reporter` does nothing, so every rank can call it unconditionally.
wandb and TensorBoard are imported only when the config turns them on.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import sys
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Optional, Union

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mtrain.train.metrics import StepMetrics, expert_load_imbalance

WANDB_MODES = ("offline", "online", "disabled")
ETA_WINDOW = 20  # recent steps whose mean duration predicts the rest

ExpertLoads = Union[torch.Tensor, Mapping[str, Union[torch.Tensor, Sequence[float]]]]


class Reporter:
    """Reports each step's metrics on the logging rank.

    ``start_step`` is the number of steps already completed (a resumed run's
    step): metrics.jsonl keeps the lines up to it and drops later ones, which a
    crash after the last checkpoint left behind.
    """

    def __init__(self, run_dir: Union[str, os.PathLike], cfg, rank: int = 0, world_size: int = 1, *,
                 start_step: int = 0, stream: Optional[IO[str]] = None, heatmap_interval: int = 100,
                 logging_rank: int = 0):
        self.active = rank == logging_rank
        if not self.active:
            return
        log_cfg = cfg.logging
        if log_cfg.wandb_mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb_mode={log_cfg.wandb_mode!r} is not one of {', '.join(WANDB_MODES)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.total_steps = int(cfg.train.steps)
        self.log_interval = max(int(log_cfg.log_interval), 1)
        self.heatmap_interval = max(heatmap_interval, 1)
        self.stream = stream if stream is not None else sys.stderr
        self._file: Optional[IO[str]] = None
        self.truncate_after(start_step)
        self._recent_step_times: deque[float] = deque(maxlen=ETA_WINDOW)
        self._last_loads: Optional[tuple[int, list[str], torch.Tensor]] = None
        self._bar = _progress_bar(self.total_steps, start_step, self.stream) if log_cfg.progress and _is_tty(self.stream) else None
        self._wandb = _start_wandb(self.run_dir, cfg, world_size) if log_cfg.wandb and log_cfg.wandb_mode != "disabled" else None
        self._tensorboard = _start_tensorboard(self.run_dir, start_step) if log_cfg.tensorboard else None

    # -- metrics.jsonl ------------------------------------------------------
    def truncate_after(self, step: int) -> None:
        """Keep only the lines of metrics.jsonl with ``step`` ≤ ``step`` (and drop
        a line cut short by a crash), then append from there."""
        if not self.active:
            return
        if self._file is not None:
            self._file.close()
        if self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if (line_step := _step_of(line)) is not None and line_step <= step]
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.metrics_path)
        self._file = open(self.metrics_path, "a")

    # -- one step ---------------------------------------------------------------
    def log(self, metrics: Union[StepMetrics, Mapping], expert_loads: Optional[ExpertLoads] = None) -> None:
        """Report one step.

        ``expert_loads``: tokens per expert of every MoE layer of the model, as
        [MoE layers, experts] or {MoE layer name: loads}. When given, it feeds the
        heatmap and is the source of both imbalance fields (replacing values
        passed in ``metrics``, which may have seen only one stage's layers).
        """
        if not self.active:
            return
        values = dataclasses.asdict(metrics) if isinstance(metrics, StepMetrics) else dict(metrics)
        names, loads = _loads_table(expert_loads)
        if loads is not None:
            per_layer = dict(zip(names, expert_load_imbalance(loads)))
            finite = [v for v in per_layer.values() if math.isfinite(v)]
            values["expert_load_imbalance_per_layer"] = per_layer
            values["expert_load_imbalance"] = max(finite) if finite else None
        record = StepMetrics.from_mapping(values).as_record()
        step = record["step"]
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._recent_step_times.append(record["step_time_s"])

        due = step % self.log_interval == 0 or step >= self.total_steps
        self._console(record, due)
        if due:
            scalars = _scalars(record)
            if self._wandb is not None:
                self._wandb.log(scalars, step=step)
            if self._tensorboard is not None:
                for key, value in scalars.items():
                    self._tensorboard.add_scalar(key, value, step)
        if loads is not None:
            self._last_loads = (step, names, loads)
            if step % self.heatmap_interval == 0:
                self._log_heatmap(step, names, loads)

    def eta_seconds(self, step: int) -> Optional[float]:
        """Mean of the recent step times × steps left (None before any step)."""
        if not self._recent_step_times:
            return None
        return sum(self._recent_step_times) / len(self._recent_step_times) * max(self.total_steps - step, 0)

    def status_line(self, record: dict) -> str:
        step = record["step"]
        mfu = record["mfu"]
        eta = self.eta_seconds(step)
        return " | ".join([
            f"step {step}/{self.total_steps}",
            _losses(record),
            f"lr {record['lr']:.3e}",
            f"{record['tokens_per_s']:.4g} tokens/s",
            f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a",
            f"ETA {_clock(eta)}",
        ]) + (" | skipped (non-finite)" if record["skipped"] else "")

    def _console(self, record: dict, due: bool) -> None:
        if self._bar is not None:
            self._bar.update(record["step"] - self._bar.n)
            mfu = record["mfu"]
            self._bar.set_postfix_str(
                f"{_losses(record)}, lr {record['lr']:.2e}, "
                f"{record['tokens_per_s']:.3g} tok/s" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
        elif due:
            print(self.status_line(record), file=self.stream, flush=True)

    # -- evaluation -----------------------------------------------------------
    def log_eval(self, record: Mapping) -> None:
        """Report one held-out evaluation (:mod:`mtrain.train.evaluate`): a line of
        metrics.jsonl with ``"kind": "eval"``, a console line, and wandb /
        TensorBoard as ``eval/<key>`` at the record's step (the greedy sample as text)."""
        if not self.active:
            return
        record = eval_json(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        line = eval_status_line(record)
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
        step, scalars = record["step"], eval_scalars(record)
        sample = record.get("sample")
        if self._wandb is not None:
            import wandb

            extra = {"eval/sample": wandb.Html(f"<pre>{_html(sample_text(sample))}</pre>")} if sample else {}
            self._wandb.log({**scalars, **extra}, step=step)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
            if sample:
                self._tensorboard.add_text("eval/sample", sample_text(sample), step)

    def eval_progress(self, total: int):
        """``(advance, close)`` for an evaluation of ``total`` batches: a second
        tqdm bar under the training bar on a terminal (``logging.progress``),
        else no-ops."""
        bar = None
        if self.active and self._bar is not None:
            from tqdm import tqdm

            bar = tqdm(total=total, file=self.stream, unit="batch", desc="eval", position=1, leave=False,
                       dynamic_ncols=True)
        return (bar.update if bar else lambda n: None), (bar.close if bar else lambda: None)

    # -- expert-load heatmap ------------------------------------------------
    def _log_heatmap(self, step: int, names: list[str], loads: torch.Tensor) -> None:
        image = render_expert_load(names, loads, step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({"expert_load": wandb.Image(image, caption=f"step {step}")}, step=step)
        if self._tensorboard is not None:
            self._tensorboard.add_image("expert_load", image, step, dataformats="HWC")

    def close(self) -> None:
        """Save the last expert-load heatmap, finish wandb, close everything."""
        if not self.active or self._file is None:
            return
        if self._last_loads is not None:
            step, names, loads = self._last_loads
            save_png(render_expert_load(names, loads, step), self.run_dir / f"expert_load_step_{step:06d}.png")
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            # finish() can return before wandb's service has written the run to
            # disk; teardown waits for it (its atexit hook is unreliable in forked
            # or multiprocessing ranks).
            wandb.teardown()
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._file.close()
        self._file = None


def render_expert_load(names: list[str], loads: torch.Tensor, step: int) -> np.ndarray:
    """RGB image [H, W, 3] of loads / mean load per layer (1 = balanced)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loads = loads.to(torch.float64)
    normalised = (loads / loads.mean(dim=1, keepdim=True).clamp_min(1e-12)).numpy()
    layers, experts = normalised.shape
    fig = Figure(figsize=(min(4 + experts / 8, 16), min(2 + layers / 4, 12)), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    shown = ax.imshow(normalised, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="tokens / mean tokens of the layer")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    if layers <= 32:
        ax.set_yticks(range(layers), names, fontsize=7)
    ax.set_title(f"expert load, step {step}")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray, path: Union[str, os.PathLike]) -> None:
    from matplotlib.image import imsave

    imsave(path, image)


# -- evaluation records -------------------------------------------------------------
EVAL_SCALARS = ("lm_loss", "ppl", "mtp_loss", "samples", "tokens", "eval_time_s")


def eval_json(record: Mapping) -> dict:
    """The record as strict JSON: non-finite numbers (a diverged loss) become None."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in dict(record).items()}


def eval_scalars(record: Mapping) -> dict[str, float]:
    """``eval/<key>`` of the record's numbers, for wandb and TensorBoard."""
    return {f"eval/{k}": float(record[k]) for k in EVAL_SCALARS if record.get(k) is not None}


def sample_text(sample: Mapping) -> str:
    return f"{sample['prompt']}{sample['completion']}"


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def eval_status_line(record: Mapping) -> str:
    """``eval step 200 (valid) | lm loss 4.6782 | ppl 107.6 | ...`` (then the greedy sample, if any)."""
    def number(key: str, fmt: str) -> str:
        value = record.get(key)
        return "nan" if value is None else format(value, fmt)

    parts = [f"eval step {record['step']} ({record.get('source', 'valid')})", f"lm loss {number('lm_loss', '.4f')}",
             f"ppl {number('ppl', '.4g')}"]
    if "mtp_loss" in record:
        parts.append(f"mtp loss {number('mtp_loss', '.4f')}")
    parts.append(f"{record['samples']} samples ({record['tokens']} tokens) in {record['eval_time_s']:.1f} s")
    line = " | ".join(parts)
    sample = record.get("sample")
    if sample:
        line += f"\n  sample: {sample_text(sample)!r}"
    return line


# -- helpers ----------------------------------------------------------------------
def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _natural_key(name: str) -> list:
    """'layers.10.mlp' after 'layers.9.mlp'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _loads_table(expert_loads: Optional[ExpertLoads]) -> tuple[list[str], Optional[torch.Tensor]]:
    """(row names, [layers, experts] tensor) from either accepted form."""
    if expert_loads is None or len(expert_loads) == 0:
        return [], None
    if isinstance(expert_loads, torch.Tensor):
        return [str(i) for i in range(expert_loads.shape[0])], expert_loads.detach().cpu()
    names = sorted(expert_loads, key=_natural_key)
    return names, torch.stack([torch.as_tensor(expert_loads[n]).detach().cpu() for n in names])


def _scalars(record: dict) -> dict[str, float]:
    """Flat numeric view for wandb / TensorBoard: None dropped, the per-layer
    imbalance as ``expert_load_imbalance/<layer>``."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key.removesuffix('_per_layer')}/{k}": v for k, v in value.items() if v is not None})
        elif value is not None and key != "step":
            out[key] = float(value)
    return out


def _losses(record: dict) -> str:
    """The LM loss (what the README and the eval report), and the MTP loss apart when there is one."""
    def number(key):
        value = record.get(key)
        return "nan" if value is None else f"{value:.4f}"
    text = f"lm loss {number('lm_loss')}"
    return text + (f", mtp loss {number('mtp_loss')}" if record.get("mtp_loss") is not None else "")


def _clock(seconds: Optional[float]) -> str:
    return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


def _is_tty(stream: IO[str]) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _progress_bar(total: int, start_step: int, stream: IO[str]):
    from tqdm import tqdm

    return tqdm(total=total, initial=start_step, file=stream, unit="step", dynamic_ncols=True)


def _plain_config(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dataclasses.asdict(cfg)


def _start_wandb(run_dir: Path, cfg, world_size: int):
    try:
        import wandb
    except ImportError:
        raise ImportError("logging.wandb=true needs the wandb package: pip install wandb "
                          "(or set logging.wandb=false)") from None
    id_file = run_dir / "wandb_run_id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        # Stored so that a resumed run continues the same wandb run.
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
    log_cfg = cfg.logging
    return wandb.init(project=log_cfg.wandb_project, entity=log_cfg.wandb_entity, dir=str(run_dir),
                      mode=log_cfg.wandb_mode, config={**_plain_config(cfg), "world_size": world_size},
                      id=run_id, resume="allow",
                      name=run_dir.name)


def _start_tensorboard(run_dir: Path, start_step: int):
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
                          "(or set logging.tensorboard=false)") from None
    # purge_step drops events a crashed run wrote after the resumed step.
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
