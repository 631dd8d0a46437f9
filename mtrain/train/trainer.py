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
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from mtrain.config.schema import resolve_dtype
from mtrain.config.validate import ConfigError
from mtrain.model.fp8 import use_fp8_backend
from mtrain.train.preflight import check_config
from mtrain.data.batching import batch_schedule
from mtrain.data.build import build_gpt_dataset
from mtrain.data.heldout import EvalBatches, build_heldout_dataset, find_tokenizer
from mtrain.data.gpt_dataset import StepLoader
from mtrain.model.moe.layer import MoELayer
from mtrain.pipeline.stages import build_chunks, unique_parameters
from mtrain.model.stats import flops_per_token
from mtrain.parallel.env import detect_env
from mtrain.parallel.groups import CollectiveTimeout, collective_device, create_groups, init_distributed
from mtrain.parallel.layout import build_layout
from mtrain.pipeline.channels import create_p2p_channels
from mtrain.pipeline.executor import PipelineExecutor
from mtrain.pipeline.render import render_timeline
from mtrain.pipeline.schedule_rules import copy_groups, placement
from mtrain.pipeline.trace import bubble_percent, gather_traces, to_timelines, write_chrome_trace
from mtrain.train import checkpoint as ckpt
from mtrain.train import checkpoint_resume
from mtrain.train.grads import attach_main_grads, global_grad_norm, main_grad, reduce_gradients
from mtrain.train.lr import LRSchedule
from mtrain.train.metrics import StepTimer, gemm_precision_census, merge_censuses, peak_memory_bytes, throughput
from mtrain.train.optimizer import ZeroAdamW
from mtrain.train.init_from import load_initial_weights
from mtrain.train.state import ModelState, Progress, RNGState
from mtrain.train.evaluate import Evaluator
from mtrain.train.watchdog import Watchdog, heartbeat_store

log = logging.getLogger("mtrain")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def setup_logging(run_dir: Path, rank: int) -> None:
    """One log file per rank; rank 0 also logs to the console. The handlers of
    an earlier run in this process (the jobs of a Hydra multirun run one after
    another) give way to this run's; handlers someone else installed (a test)
    are kept and used instead."""
    for old in [h for h in log.handlers if getattr(h, "mtrain_run", False)]:
        log.removeHandler(old)
        old.close()
    if log.handlers:
        return
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    handlers = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler())
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.mtrain_run = True
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
        # Every group starts with the generous timeout (or the fixed one); the steps size it later.
        self.timeouts = CollectiveTimeout.from_config(cfg.train)
        self.env = init_distributed(cfg.parallel.backend, self.timeouts.current_s, env)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        p = cfg.parallel
        self.layout = build_layout(self.world, p.tp, p.ep, p.expert_tp, p.pp, p.order, copy_groups(p.schedule, p.pp))
        with self.phase("creating process groups"):
            self.groups = create_groups(self.layout, self.timeouts.current_s)
        self.pp_rank = self.layout.pp_rank(self.rank)
        self.placement = placement(p.schedule, p.pp, self.pp_rank, mtp=cfg.model.mtp_depth > 0)
        setup_logging(self.run_dir, self.rank)
        torch.manual_seed(cfg.train.seed + self.rank)

        self.device = collective_device()
        if self.device.type == "cuda":
            # fp32 matmuls on tensor cores (TF32): fp32 runs' MFU peak is the TF32 one.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.train.fp8 == "blockwise":
            try:
                use_fp8_backend(str(cfg.train.fp8_backend), self.device)
            except ValueError as e:
                raise ConfigError([str(e)]) from None
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.checkpointer = ckpt.Checkpointer(self.ckpt_dir, self.groups, keep_last=cfg.checkpoint.keep_last,
                                              async_save=cfg.checkpoint.async_save)
        self._resume_plan: Optional[checkpoint_resume.ResumePlan] = None  # chosen once, by all ranks together
        self.chunks = build_chunks(cfg, self.groups, self.pp_rank)
        self.dtype = self._training_dtype()
        for chunk in self.chunks.values():
            chunk.to(self.device)
            if self.dtype == "bf16":  # buffers (router bias, loads) stay fp32
                for param in chunk.parameters():
                    param.data = param.data.to(torch.bfloat16)
        self.params = unique_parameters(self.chunks)
        self.gemm_census = self._gemm_census()  # for the run's first record: which GEMMs run FP8
        # 16-bit parameters accumulate, reduce and update from fp32 main gradients.
        self._main_grad_hooks = attach_main_grads(self.params)
        # Names this rank speaks for in the gradient norm (second copies of a
        # stage and the last stage's MTP copy of the embedding count elsewhere).
        self.counted = {name for key, chunk in self.chunks.items() for name, _ in chunk.named_parameters()
                        if self.placement.speaks_for(key, name)}
        channels = create_p2p_channels(self.layout.groups["pp"], p.schedule, p.pp,
                                       datetime.timedelta(seconds=self.timeouts.current_s))
        # The global batch of each step (train.global_batch_size, its ramp) and one executor per micro-batch count.
        self.batch = batch_schedule(cfg.train, p, self.groups.size("dp"))
        self._channels, self._executors = channels, {}
        # The checkpointer's own gloo group keeps its long timeout: all it carries
        # is checkpoint work, an async save's even while the steps go on.
        self.timeouts.groups = lambda: [*self.groups.process_groups(), *self._channels.values()]
        self.executor = self._executor_for(self.batch.num_microbatches)
        self.optimizer = ZeroAdamW(self.params, self.groups, cfg.train, zero=cfg.train.zero1)
        self.lr = LRSchedule(cfg.train)

        dataset = build_gpt_dataset(cfg.data, cfg.model.vocab_size, split=cfg.eval.split)  # its train part
        self.loader = StepLoader(dataset, cfg.train.micro_batch_size, self.batch.num_microbatches,
                                 self.groups.index("dp"), self.groups.size("dp"), schedule=self.batch)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.timer = StepTimer(self.device)
        self.step = 0
        self.first_step = 0  # where this run started (a resume's step)
        self.bad_steps = 0
        self.reporter = None
        self.evaluator = self._build_evaluator()

    # -- helpers --------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, what: str):
        """Name the rank and the operation when something fails (a collective
        timeout otherwise says little about where the run was)."""
        try:
            yield
        except ckpt.CheckpointError:
            raise  # says what failed and the fix already, the same on every rank
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

    def save(self, final: bool = False) -> None:
        """Checkpoint this step. A save that fails on storage (a full disk)
        leaves the previous checkpoint and ``latest`` as they were; then
        ``checkpoint.on_save_error`` says whether training goes on (retrying
        at the next interval) or stops. A ``final`` save (the last step, a stop
        request) has no next interval: its failure always stops the run."""
        with self.timeouts.long_operation(), self.phase(f"saving checkpoint of step {self.step}"):
            try:
                self.checkpointer.wait()  # an async save still in flight reports its failure here
            except ckpt.CheckpointSaveError as e:
                self._on_save_error(e, final=False)
            try:
                self.checkpointer.save(self.step, *self.checkpoint_components(Progress(self.step)))
                if final:
                    self.checkpointer.wait()
            except ckpt.CheckpointSaveError as e:
                self._on_save_error(e, final)

    def _on_save_error(self, error: ckpt.CheckpointSaveError, final: bool) -> None:
        c = self.cfg.checkpoint
        if final or c.on_save_error == "stop":
            raise error
        log.warning("%s. Training goes on (checkpoint.on_save_error=continue) and saves again at the next "
                    "checkpoint.interval (%d steps)", error, c.interval)

    def _resume_path(self) -> Optional[Path]:
        """The verified checkpoint this run continues from (None: step 0),
        chosen once by all ranks together (see :mod:`checkpoint_resume`)."""
        if self._resume_plan is None:
            self._resume_plan = checkpoint_resume.plan_resume(self.checkpointer, str(self.cfg.checkpoint.resume))
        return self._resume_plan.path

    def maybe_resume(self) -> None:
        path = self._resume_path()
        if path is not None:
            progress = Progress()
            # The lr schedule warns when it changed; RNG states come back only at the same world size.
            with self.timeouts.long_operation(), self.phase(f"loading checkpoint {path}"):
                self.checkpointer.load(path, *self.checkpoint_components(progress))
            self.step = progress.step
            if self.rank == 0:
                log.info("resumed from %s at step %d", path, self.step)
            self._check_data_position()
        # Refuse to start over on checkpoints, or set aside what failed verification
        # and what this run's saves would overwrite (before any initial weights load).
        checkpoint_resume.apply_plan(self.checkpointer, self._resume_plan, self.step,
                                     self.cfg.checkpoint.allow_fresh_start)
        if path is None and self.cfg.checkpoint.init_from:  # nothing to resume: start from these weights (docs/hf.md)
            with self.phase(f"loading initial weights from {self.cfg.checkpoint.init_from}"):
                load_initial_weights(self.cfg.checkpoint.init_from, self.checkpointer, self.params,
                                     self.chunks.values(), self.optimizer, self.cfg.model, self.run_dir)

    # -- global batch and data position ---------------------------------------
    def _executor_for(self, num_microbatches: int) -> PipelineExecutor:
        """The pipeline executor for a step of ``num_microbatches`` micro-batches,
        built on first use and kept (a batch-size ramp runs several counts; the
        schedule's rules were checked for each by the preflight). Building one
        is local: the p2p channels are created once, by the constructor."""
        executor = self._executors.get(num_microbatches)
        if executor is None:
            p = self.cfg.parallel
            executor = PipelineExecutor(p.schedule, p.pp, self.pp_rank, num_microbatches, self.chunks,
                                        self.layout.group_of("pp", self.rank), overlap=p.overlap,
                                        channels=self._channels)
            self._executors[num_microbatches] = executor
        return executor

    def _check_data_position(self) -> None:
        """After a resume every rank must continue from the same global data
        position (samples consumed). It is saved per rank, identical on all;
        a resume on another world size gives every rank rank 0's. Any dp and
        micro-batch size then cut the same global batches from it."""
        consumed = self.loader.position.consumed_samples
        bounds = torch.tensor([consumed, -consumed], dtype=torch.int64, device=self.device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        high, low = int(bounds[0].item()), -int(bounds[1].item())
        if high != low:
            raise RuntimeError(f"the checkpoint's data positions disagree between ranks ({low} to {high} samples "
                               f"consumed); resume from another checkpoint")
        if self.rank == 0:
            log.info("data position: %d samples consumed; the next step's global batch is %d sequences",
                     consumed, self.loader.global_batch)

    def _log_data_plan(self) -> None:
        """Rank 0 logs the global batch (and its ramp) and, for a blend, what
        each dataset gives to the whole run."""
        if self.rank != 0:
            return
        b, steps = self.batch, self.cfg.train.steps
        log.info("global batch %d sequences = %d micro-batches of %d on each of %d data-parallel ranks",
                 b.global_batch_size, b.num_microbatches, b.micro_batch_size, b.dp)
        if b.ramp is not None:
            ramp_steps, ramp_samples = b.ramp_steps()
            log.info("batch ramp: %d -> %d sequences by %d over the first %d samples (%d ramp steps take %d "
                     "samples; the full batch from step %d)", b.ramp.start_size, b.global_batch_size,
                     b.ramp.increment, b.ramp.ramp_samples, ramp_steps, ramp_samples, ramp_steps + 1)
        summary = getattr(self.loader.dataset, "summary", None)
        if summary is not None:
            total = b.samples_after(steps)
            log.info("data blend over %d steps (%d samples):\n  %s", steps, total, "\n  ".join(summary(total)))

    def _data_metrics(self, global_batch: int) -> dict:
        """The step's global batch, the samples consumed after it and, for a
        blend, the samples drawn from each dataset so far."""
        consumed = self.loader.position.consumed_samples
        out = {"global_batch_size": global_batch, "consumed_samples": consumed}
        counts = getattr(self.loader.dataset, "source_counts", None)
        if counts is not None:
            out["blend_samples"] = counts(consumed)
        return out

    # -- one step -----------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        self.timer.start()
        global_batch = self.loader.global_batch  # this step's (a batch-size ramp changes it)
        batches = [{"input_ids": x.to(self.device, non_blocking=True), "labels": y.to(self.device, non_blocking=True)}
                   for x, y in self.loader.next_step()]
        self.executor = self._executor_for(len(batches))
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
        speed = throughput(global_batch * cfg.data.seq_len, elapsed, self.flops_per_token, self.world,
                           cfg.cluster.peak_tflops, self.dtype)
        return {
            "step": self.step, **losses, "grad_norm": float(norm), "lr": lr,
            **speed, "bubble_pct": bubble_pct, "grad_sync_mb": sync_bytes / 2**20,
            "peak_memory_gb": peak_memory_bytes() / 2**30, "step_time_s": elapsed, "skipped": not finite,
            **self._data_metrics(global_batch), "_loads": loads,
            **(self.gemm_census if self.step == self.first_step + 1 else {}),
        }

    def _gemm_census(self) -> dict:
        """Which GEMM sites of the whole model run FP8, every stage counted once
        (a DualPipe stage's second copy, direction 1, is left out)."""
        own = [chunk for (stage, direction), chunk in self.chunks.items() if direction == 0]
        stages = [None] * self.groups.size("pp")
        dist.all_gather_object(stages, gemm_precision_census(own), group=self.groups.group("pp"))
        return merge_censuses(stages)

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

    # -- held-out evaluation (mtrain.train.evaluate) ---------------------------
    def _build_evaluator(self) -> Optional[Evaluator]:
        """The run's held-out evaluation; None when nothing is held out (no
        ``eval.split``, no ``eval.path``)."""
        cfg, b = self.cfg, self.batch
        try:
            dataset = build_heldout_dataset(cfg.data, cfg.eval, cfg.model.vocab_size)
            if dataset is None:
                return None
            batches = EvalBatches(dataset, cfg.eval.steps, b.micro_batch_size, b.num_microbatches,
                                  self.groups.index("dp"), self.groups.size("dp"))
        except ValueError as e:  # too few held-out documents or samples: the fix is in the config
            raise ConfigError([str(e)]) from e
        tokenizer = None
        if cfg.eval.prompt:
            tokenizer, path = find_tokenizer(cfg.data, cfg.model.vocab_size)
            if tokenizer is None and self.rank == 0:
                log.warning("eval.prompt is set but there is no tokenizer at %s (set data.tokenizer): "
                            "evaluations show no greedy sample", path)
        return Evaluator(cfg.eval, cfg.model, batches, self._executor_for(b.num_microbatches), self.chunks,
                         speaks=self.groups.index("tp") == 0, device=self.device,
                         source="valid" if cfg.eval.path is None else str(cfg.eval.path), tokenizer=tokenizer,
                         tp_size=self.groups.size("tp"))

    def maybe_evaluate(self, last: bool) -> Optional[dict]:
        """Evaluate after this step when due: every ``eval.interval`` steps and,
        with ``eval.at_end``, after the last one."""
        e = self.cfg.eval
        due = (bool(e.interval) and self.step % e.interval == 0) or (last and e.at_end)
        return self.evaluate() if due and self.evaluator is not None else None

    def evaluate(self, progress: Optional[Callable[[int], None]] = None) -> dict:
        """The held-out loss of the model as it is now (every rank together);
        reported (metrics.jsonl, console, wandb, TensorBoard) when the loop's
        reporter runs. ``progress(n)``: called after every held-out batch."""
        if self.evaluator is None:
            raise ConfigError(["nothing is held out to evaluate: set eval.split=98/1/1 (documents of data.path) "
                               "or eval.path=<indexed dataset prefix>"])
        close = None
        if progress is None and self.reporter is not None:
            progress, close = self.reporter.eval_progress(len(self.evaluator.batches))
        try:
            with self.timeouts.long_operation(), self.phase(f"evaluation after step {self.step}"):
                record = self.evaluator.run(self.step, progress)
        finally:
            if close is not None:
                close()
        if self.reporter is not None:
            self.reporter.log_eval(record)
        return record

    def load_model(self, path: Path) -> None:
        """Only the model's weights and router biases (and the step) from the
        checkpoint at ``path``, resharded to this run's layout; optimizer, data
        position, LR schedule and RNG stay as built."""
        with self.phase(f"loading model weights from {path}"):
            self.checkpointer.load(path, {"model": ModelState(self.params, self.chunks.values())})
            self.step = int(ckpt.read_manifest(path)["step"])

    def evaluate_checkpoint(self, progress: Optional[Callable[[int], None]] = None) -> dict:
        """``mtrain-eval``: the held-out loss of the checkpoint ``checkpoint.resume``
        names (``latest``: the run's newest; ``none``: the initial weights) at
        the layout launched. The record adds ``checkpoint``."""
        path = self._resume_path()
        if path is None and self.cfg.checkpoint.resume != "none":
            raise ConfigError([f"no complete checkpoint under {self.ckpt_dir} to evaluate: pass "
                               f"checkpoint.resume=<checkpoint directory> (or checkpoint.dir=<its parent>)"])
        if path is not None:
            self.load_model(path)
        record = self.evaluate(progress)
        record["checkpoint"] = None if path is None else str(path)
        return record

    # -- the loop -------------------------------------------------------------
    def run(self) -> int:
        from mtrain.train.reporting import Reporter

        cfg = self.cfg
        self.maybe_resume()
        if self.step >= cfg.train.steps:
            if self.rank == 0:
                log.info("the run is complete: its checkpoint is at step %d of train.steps=%d; nothing to do "
                         "(raise train.steps to train further)", self.step, cfg.train.steps)
            return 0
        self._log_data_plan()
        self.first_step = self.step  # the run's first record (after a resume too) carries the GEMM census
        watchdog = None if cfg.train.watchdog_s == 0 else Watchdog(
            self.rank, self.world, cfg.train.watchdog_s, heartbeat_store() if self.world > 1 else None)
        previous = {s: signal.signal(s, self._request_stop) for s in STOP_SIGNALS}
        if self.rank == 0:
            OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
        self.reporter = Reporter(self.run_dir, cfg, self.rank, self.world, start_step=self.step,
                                 heatmap_interval=cfg.logging.heatmap_interval)
        try:
            while self.step < cfg.train.steps:
                # The watchdog and the timeout judge every collective of the step, up to the stop agreement.
                started = time.monotonic()
                if watchdog is not None:
                    watchdog.step_started(self.step + 1)
                tracing = self.step + 1 == cfg.logging.trace_step  # rank 0 draws it while the others wait
                with self.timeouts.long_operation() if tracing else contextlib.nullcontext():
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
                stop = self._stop_agreed()
                if watchdog is not None:
                    watchdog.step_finished()
                self.timeouts.step_done(time.monotonic() - started, watchdog.budget() if watchdog else None)
                if last or stop:
                    self.timeouts.end_of_run()
                if not stop:  # a stop request (preemption) checkpoints first
                    self.maybe_evaluate(last)
                if stop or (exit_now and not last):
                    self.save(final=True)
                    if self.rank == 0:
                        log.warning("stopped at step %d; checkpoint written", self.step)
                    self.stopped_early = True  # the launcher may requeue the job (Slurm's time-limit warning)
                    return 0
                if last or self.step % cfg.checkpoint.interval == 0:
                    self.save(final=last)
            self.checkpointer.wait()
            return 0
        finally:
            self.timeouts.end_of_run()
            if watchdog is not None:
                watchdog.close()
            self.reporter.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
