"""The training loop: layout, model chunks, pipeline executor, data,
ZeRO-1 AdamW, router balancing, metrics and checkpoints, for one rank.

Every rank runs the same loop; which parts of the model it holds follows from
the layout. A stop request (SIGTERM / SIGUSR1, e.g. Slurm preemption) is
honoured at the next step boundary on all ranks together: checkpoint, exit 0.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from mtrain.config.schema import resolve_dtype
from mtrain.config.validate import ConfigError
from mtrain.train.preflight import check_config
from mtrain.data.build import build_gpt_dataset
from mtrain.data.gpt_dataset import StepLoader
from mtrain.model.moe.layer import MoELayer
from mtrain.pipeline.stages import build_chunks, unique_parameters
from mtrain.model.stats import flops_per_token
from mtrain.parallel.env import detect_env
from mtrain.parallel.groups import collective_device, create_groups, init_distributed
from mtrain.parallel.layout import build_layout
from mtrain.pipeline.channels import create_p2p_channels
from mtrain.pipeline.executor import PipelineExecutor
from mtrain.pipeline.render import render_timeline
from mtrain.pipeline.schedule_rules import copy_groups, placement
from mtrain.pipeline.trace import bubble_percent, gather_traces, to_timelines, write_chrome_trace
from mtrain.train import checkpoint as ckpt
from mtrain.train.grads import attach_main_grads, global_grad_norm, main_grad, reduce_gradients
from mtrain.train.lr import LRSchedule
from mtrain.train.metrics import StepTimer, peak_memory_bytes, throughput
from mtrain.train.optimizer import ZeroAdamW
from mtrain.train.state import ModelState, Progress, RNGState

log = logging.getLogger("mtrain")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def setup_logging(run_dir: Path, rank: int) -> None:
    """One log file per rank; rank 0 also logs to the console."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    handlers = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler())
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.setLevel(logging.INFO)


class TrainingAborted(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


class Trainer:
    def __init__(self, cfg, run_dir: str | os.PathLike):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._stop_requested = False
        self.stop_signal = None
        self.stopped_early = False  # stopped on a signal or train.exit_interval, checkpoint written
        env = detect_env()
        check_config(cfg, env.world_size)
        self.env = init_distributed(cfg.parallel.backend, cfg.train.collective_timeout_s, env)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        p = cfg.parallel
        self.layout = build_layout(self.world, p.tp, p.ep, p.expert_tp, p.pp, p.order, copy_groups(p.schedule, p.pp))
        with self.phase("creating process groups"):
            self.groups = create_groups(self.layout, cfg.train.collective_timeout_s)
        self.pp_rank = self.layout.pp_rank(self.rank)
        self.placement = placement(p.schedule, p.pp, self.pp_rank, mtp=cfg.model.mtp_depth > 0)
        if not log.handlers:
            setup_logging(self.run_dir, self.rank)
        torch.manual_seed(cfg.train.seed + self.rank)

        self.device = collective_device()
        if self.device.type == "cuda":
            # fp32 matmuls on tensor cores (TF32): fp32 runs' MFU peak is the TF32 one.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.chunks = build_chunks(cfg, self.groups, self.pp_rank)
        self.dtype = self._training_dtype()
        for chunk in self.chunks.values():
            chunk.to(self.device)
            if self.dtype == "bf16":  # buffers (router bias, loads) stay fp32
                for param in chunk.parameters():
                    param.data = param.data.to(torch.bfloat16)
        self.params = unique_parameters(self.chunks)
        # 16-bit parameters accumulate, reduce and update from fp32 main gradients.
        self._main_grad_hooks = attach_main_grads(self.params)
        # Names this rank speaks for in the gradient norm (second copies of a
        # stage and the last stage's MTP copy of the embedding count elsewhere).
        self.counted = {name for key, chunk in self.chunks.items() for name, _ in chunk.named_parameters()
                        if self.placement.speaks_for(key, name)}
        channels = create_p2p_channels(self.layout.groups["pp"], p.schedule, p.pp,
                                       datetime.timedelta(seconds=cfg.train.collective_timeout_s))
        self.executor = PipelineExecutor(p.schedule, p.pp, self.pp_rank, p.num_microbatches, self.chunks,
                                         self.layout.group_of("pp", self.rank), overlap=p.overlap, channels=channels)
        self.optimizer = ZeroAdamW(self.params, self.groups, cfg.train, zero=cfg.train.zero1)
        self.lr = LRSchedule(cfg.train)

        dataset = build_gpt_dataset(cfg.data, cfg.model.vocab_size)
        self.loader = StepLoader(dataset, cfg.train.micro_batch_size, p.num_microbatches,
                                 self.groups.index("dp"), self.groups.size("dp"))
        self.tokens_per_step = cfg.train.micro_batch_size * p.num_microbatches * self.groups.size("dp") * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.timer = StepTimer(self.device)
        self.checkpointer = ckpt.Checkpointer(self.ckpt_dir, self.groups, keep_last=cfg.checkpoint.keep_last,
                                              async_save=cfg.checkpoint.async_save)
        self.step = 0
        self.bad_steps = 0
        self.reporter = None

    # -- helpers --------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, what: str):
        """Name the rank and the operation when something fails (a collective
        timeout otherwise says little about where the run was)."""
        try:
            yield
        except Exception as e:
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise RuntimeError(f"rank {rank}, step {getattr(self, 'step', 0)}: {what} failed: {e}") from e

    def _request_stop(self, signum, frame):
        log.warning("rank %d: received signal %d, will checkpoint and stop at the next step boundary", self.rank, signum)
        self._stop_requested = True
        self.stop_signal = signum

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _training_dtype(self) -> str:
        """``train.dtype`` of this run, logged once. ``auto`` is bf16 on nccl and
        fp32 on gloo, but a resumed run keeps the dtype its checkpoint was
        trained in: a run moved to other hardware does not change precision
        halfway (nor lose the fp32 masters only bf16 checkpoints hold)."""
        asked = str(self.cfg.train.dtype)
        dtype = resolve_dtype(asked, dist.get_backend())
        path = self._resume_path()
        saved = self._checkpoint_dtype(path)
        if saved is not None and saved != dtype:
            if asked == "auto":
                dtype = saved
            elif saved == "fp32":
                raise ConfigError([f"train.dtype=bf16 cannot resume {path}: it was trained in fp32 and holds no "
                                   f"fp32 master weights; resume it with train.dtype=fp32 (or auto)"])
            elif self.rank == 0:
                log.warning("%s was trained in bf16; train.dtype=fp32 continues from its bf16 weights "
                            "(the fp32 masters are not used)", path)
        if self.rank == 0:
            log.info("training in %s (train.dtype=%s, backend %s, checkpoint to resume: %s)",
                     dtype, asked, dist.get_backend(), f"{path}, trained in {saved}" if saved else "none")
        return dtype

    def _checkpoint_dtype(self, path: Optional[Path]) -> Optional[str]:
        """The dtype the checkpoint at ``path`` was trained in: the stored dtype of
        this rank's weights. None without one, or when it cannot be read (the
        load then reports why)."""
        if path is None:
            return None
        try:
            stored = ckpt.stored_dtypes(path)
        except Exception:  # a missing or damaged checkpoint: Checkpointer.load names the problem
            return None
        found = {stored[name] for name in unique_parameters(self.chunks) if name in stored}
        return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(found.pop()) if len(found) == 1 else None

    def moe_layers(self, counted_only: bool = False) -> list[tuple[str, object]]:
        out = []
        for key, chunk in sorted(self.chunks.items()):
            if counted_only and not self.placement.is_original(key):
                continue
            for name, module in chunk.named_modules():
                if isinstance(module, MoELayer):
                    out.append((name, module))
        return out

    # -- checkpoint state -------------------------------------------------
    def checkpoint_components(self, progress: Progress) -> tuple[dict, dict]:
        """The (sharded, per-rank) Stateful components a checkpoint holds."""
        sharded = {"model": ModelState(self.params, self.chunks.values()), "optimizer": self.optimizer}
        per_rank = {"progress": progress, "data": self.loader, "lr": self.lr, "rng": RNGState(self.device, self.world)}
        return sharded, per_rank

    def save(self) -> None:
        with self.phase(f"saving checkpoint of step {self.step}"):
            self.checkpointer.save(self.step, *self.checkpoint_components(Progress(self.step)))

    def _resume_path(self) -> Optional[Path]:
        choice = self.cfg.checkpoint.resume
        if choice == "none":
            return None
        return ckpt.find_latest(self.ckpt_dir) if choice == "latest" else Path(choice)

    def maybe_resume(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        progress = Progress()
        # The lr schedule warns when it changed; RNG states come back only at the same world size.
        with self.phase(f"loading checkpoint {path}"):
            self.checkpointer.load(path, *self.checkpoint_components(progress))
        self.step = progress.step
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)

    # -- one step -----------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        self.timer.start()
        batches = [{"input_ids": x.to(self.device, non_blocking=True), "labels": y.to(self.device, non_blocking=True)}
                   for x, y in self.loader.next_step()]
        self.optimizer.zero_grad()
        self.executor.trace = self.step + 1 == cfg.logging.trace_step
        with self.phase("pipeline step"):
            result = self.executor.step(batches)
        if result.trace is not None:
            self._write_trace(result.trace)
        with self.phase("gradient reduction"):
            scatter = self.optimizer.reduce_scatter_grads if self.optimizer.zero else None
            sync_bytes = reduce_gradients(self.params, self.groups, self.placement, scatter,
                                          cfg.parallel.grad_reduce_dtype)
            norm = global_grad_norm(self.params, self.counted, self.optimizer.representative, self.groups)
        losses = self._global_losses(result)
        lr = self.lr.lr(self.step)
        finite = bool(torch.isfinite(norm)) and all(math.isfinite(v) for v in losses.values())
        if finite:
            self.bad_steps = 0
            if cfg.train.grad_clip > 0 and norm > cfg.train.grad_clip:
                scale = cfg.train.grad_clip / (float(norm) + 1e-6)
                for p in self.params.values():
                    main_grad(p).mul_(scale)
            with self.phase("optimizer step"):
                sync_bytes += self.optimizer.step(lr)
            loads = self._update_router_bias()
        else:
            self.bad_steps += 1
            loads = {}
            for _, moe in self.moe_layers():
                moe.router.load.zero_()  # routing of a non-finite step must not steer the bias
            if self.rank == 0:
                log.warning("step %d: non-finite loss or gradient norm, step skipped (%d in a row)",
                            self.step + 1, self.bad_steps)
            if self.bad_steps > cfg.train.max_bad_steps:
                raise TrainingAborted(
                    f"{self.bad_steps} consecutive steps had a non-finite loss or gradient norm "
                    f"(train.max_bad_steps={cfg.train.max_bad_steps}); lower train.lr or check the data")
        self.step += 1
        self.timer.stop()
        bubble = torch.tensor([result.idle / max(result.wall, 1e-9)], device=self.device)
        dist.all_reduce(bubble)
        bubble_pct = 100.0 * bubble.item() / self.world  # the step's last sync
        elapsed = self.timer.seconds()
        speed = throughput(self.tokens_per_step, elapsed, self.flops_per_token, self.world,
                           cfg.cluster.peak_tflops, self.dtype)
        return {
            "step": self.step, **losses, "grad_norm": float(norm), "lr": lr,
            **speed, "bubble_pct": bubble_pct, "grad_sync_mb": sync_bytes / 2**20,
            "peak_memory_gb": peak_memory_bytes() / 2**30, "step_time_s": elapsed, "skipped": not finite,
            "_loads": loads,
        }

    def _write_trace(self, trace) -> None:
        """All ranks' timelines of this step on rank 0: a Chrome trace of every
        rank and a PNG of the first pipeline, drawn like the simulator's."""
        traces = gather_traces(trace)
        if self.rank != 0:
            return
        out = self.run_dir / "trace"
        out.mkdir(exist_ok=True)
        write_chrome_trace(str(out / f"step_{self.step + 1:06d}.json"), traces)
        pipeline = [traces[r] for r in self.layout.group_of("pp", 0)]
        title = f"{self.cfg.parallel.schedule} pp={self.cfg.parallel.pp}: measured step {self.step + 1}"
        render_timeline(to_timelines(pipeline), str(out / f"step_{self.step + 1:06d}.png"), title)
        log.info("step trace written to %s (bubble per pp rank: %s %%)", out,
                 ", ".join(f"{b:.1f}" for b in bubble_percent(pipeline)))

    def _global_losses(self, result) -> dict:
        """Mean losses over every micro-batch of every data-parallel replica."""
        keys = ("loss", "lm_loss", "mtp_loss", "aux_loss")
        speaks = self.groups.index("tp") == 0
        sums = torch.zeros(len(keys) + 2, dtype=torch.float64, device=self.device)
        if speaks:
            for mb, loss in result.losses.items():
                sums[0] += loss
                sums[1] += result.metrics.get(mb, {}).get("lm_loss", loss)
                sums[2] += result.metrics.get(mb, {}).get("mtp_loss", 0.0)
                sums[len(keys)] += 1
            # Every copy of every MoE layer: each micro-batch passed one copy once.
            if result.aux_loss_sum is not None:
                sums[3] += result.aux_loss_sum.double()
                sums[len(keys) + 1] += result.aux_loss_count
        dist.all_reduce(sums)
        count, aux_count = max(sums[len(keys)].item(), 1), max(sums[len(keys) + 1].item(), 1)
        out = {k: sums[i].item() / count for i, k in enumerate(keys[:3])}
        out["aux_loss"] = sums[3].item() / aux_count
        if self.cfg.model.mtp_depth == 0:
            out.pop("mtp_loss")
        return out

    def _update_router_bias(self) -> dict:
        """Loads summed over every copy that saw different tokens (dp replicas,
        the two copies of a stage), then the same bias update everywhere."""
        loads = {}
        for name, moe in self.moe_layers():
            load = moe.router.load.clone()
            dist.all_reduce(load, group=self.groups.group("dp"))
            if self.placement.copies_per_stage > 1:
                dist.all_reduce(load, group=self.groups.group("stage_copy"))
            moe.router.update_bias(load, self.cfg.model.bias_update_speed)
            loads[name] = load
        counted = {name for name, _ in self.moe_layers(counted_only=True)}
        return {k: v for k, v in loads.items() if k in counted}

    # -- the loop -------------------------------------------------------------
    def run(self) -> int:
        from mtrain.train.reporting import Reporter

        cfg = self.cfg
        self.maybe_resume()
        previous = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS}
        if self.rank == 0:
            OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
        self.reporter = Reporter(self.run_dir, cfg, self.rank, self.world, start_step=self.step,
                                 heatmap_interval=cfg.logging.heatmap_interval)
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                loads = metrics.pop("_loads")
                gathered = [None] * self.world
                dist.all_gather_object(gathered, {k: v.tolist() for k, v in loads.items()})
                if self.rank == 0:
                    merged = {}
                    for part in gathered:
                        merged.update(part)
                    self.reporter.log(metrics, expert_loads=merged)
                last = self.step == cfg.train.steps
                exit_now = bool(cfg.train.exit_interval) and self.step % cfg.train.exit_interval == 0
                if self._stop_agreed() or (exit_now and not last):
                    self.save()
                    self.checkpointer.wait()
                    if self.rank == 0:
                        log.warning("stopped at step %d; checkpoint written", self.step)
                    self.stopped_early = True  # the launcher may requeue the job (Slurm's time-limit warning)
                    return 0
                if last or self.step % cfg.checkpoint.interval == 0:
                    self.save()
            self.checkpointer.wait()
            return 0
        finally:
            self.reporter.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
