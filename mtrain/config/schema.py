"""Structured (dataclass) schemas for every config group.

The YAML files under ``configs/`` are merged onto these, so a misspelt key or a
value of the wrong type is rejected by OmegaConf before anything runs.
Fields with a fixed set of values are :class:`Choice` enums, so a bad value
is rejected when the config is composed. Cross-field rules live in
:mod:`mtrain.config.validate` and :mod:`mtrain.train.preflight`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """One of a fixed set of names, usable wherever the plain string is.

    OmegaConf converts YAML and command-line strings by member *name*, so every
    member's name must equal its value. The str mixin keeps ``==``, ``in``,
    dict lookups and ``json.dumps`` working with plain strings; ``__str__`` and
    ``__format__`` give the bare value (not ``Schedule.dualpipe``) in f-strings
    and interpolations such as ``run_dir``.
    """

    def __init__(self, value: str):
        if self._name_ != value:
            raise ValueError(f"{type(self).__name__}.{self._name_} must have the value {self._name_!r}")

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def _choice(name: str, *values: str) -> type[Choice]:
    # The functional API: member name = value, and names such as "1f1b" are not identifiers.
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


Schedule = _choice("Schedule", "1f1b", "zb1p", "dualpipe", "dualpipev")
Dispatcher = _choice("Dispatcher", "auto", "local", "alltoall", "deepep")
Backend = _choice("Backend", "auto", "gloo", "nccl")
Recompute = _choice("Recompute", "none", "selective", "full")
ScoreFunc = _choice("ScoreFunc", "sigmoid", "softmax")
GroupScore = _choice("GroupScore", "top2_sum", "max")  # a router group's score (see ModelConfig)
GroupedGemm = _choice("GroupedGemm", "auto", "torch", "grouped_mm", "triton")
Dtype = _choice("Dtype", "auto", "fp32", "bf16")  # auto: see resolve_dtype
GradReduceDtype = _choice("GradReduceDtype", "fp32", "bf16")
LrSchedule = _choice("LrSchedule", "cosine", "wsd", "constant")
WandbMode = _choice("WandbMode", "offline", "online", "disabled")
Output = _choice("Output", "text", "json")
OnSaveError = _choice("OnSaveError", "stop", "continue")  # a checkpoint save that failed on storage
Fp8 = _choice("Fp8", "none", "blockwise")  # FP8 GEMMs (docs/fp8.md)
Fp8Backend = _choice("Fp8Backend", "reference", "scaled_mm")  # what runs them (docs/fp8.md)


def resolve_dtype(dtype: str, backend: str) -> str:
    """The dtype trained in: ``auto`` is fp32 on gloo (CPU ranks, where bf16
    matmuls are slow) and bf16 otherwise: on nccl, and for ``auto`` when a run
    is planned without processes (a planned cluster is taken to be GPUs)."""
    if str(dtype) != "auto":
        return str(dtype)
    return "fp32" if str(backend) == "gloo" else "bf16"


@dataclass
class ModelConfig:
    name: str = MISSING
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    # Dense SwiGLU layers before the MoE layers start, and their FFN width.
    first_k_dense: int = 1
    ffn_hidden_size: int = MISSING
    # Multi-head Latent Attention.
    num_heads: int = MISSING
    q_lora_rank: int = 0  # 0: queries are not compressed
    kv_lora_rank: int = MISSING
    qk_nope_head_dim: int = MISSING
    qk_rope_head_dim: int = MISSING
    v_head_dim: int = MISSING
    # Mixture of experts.
    num_routed_experts: int = MISSING
    num_shared_experts: int = 1
    moe_ffn_hidden_size: int = MISSING
    moe_topk: int = MISSING
    n_group: int = 1
    topk_group: int = 1
    score_func: ScoreFunc = ScoreFunc.sigmoid
    # How group-limited routing scores a group: the sum of its two best biased
    # scores (DeepSeek-V3) or its best score (DeepSeek-V2's group_limited_greedy).
    group_score: GroupScore = GroupScore.top2_sum
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Node-limited routing (DeepSeek-V3: 4): a token's experts come from at most
    # this many nodes of the EP group, those whose top (moe_topk / this) scores
    # sum highest; 0: no limit.
    max_nodes_per_token: int = 0
    bias_update_speed: float = 0.001  # gamma of aux-loss-free balancing; 0 disables
    aux_loss_alpha: float = 0.0001  # sequence-wise auxiliary loss coefficient
    # Multi-token prediction.
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # Norms, positions, init.
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    rope_scaling_factor: float = 1.0  # YaRN factor; 1.0: no extension
    rope_original_max_seq_len: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 1.0
    init_std: float = 0.006
    # Routed experts' grouped GEMM (docs/kernels.md).
    grouped_gemm: GroupedGemm = GroupedGemm.auto
    recompute: Recompute = Recompute.none  # activation recompute
    # torch.compile the work between the GEMMs (norms, rope + attention core,
    # SwiGLU, router); see docs/model.md.
    compile: bool = False


@dataclass
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    expert_tp: int = 1
    pp: int = 1
    # Data-parallel size; null derives it as world_size / (tp * pp).
    dp: Optional[int] = None
    # Rank order, fastest-varying first (Megatron's convention).
    order: str = "tp-cp-ep-dp-pp"
    schedule: Schedule = Schedule["1f1b"]
    # Micro-batches per data-parallel rank per step. null: derived from
    # train.global_batch_size (1 when that is null too); when both are set they
    # must agree (docs/data.md).
    num_microbatches: Optional[int] = None
    # Layers per model stage (length = number of model stages); null: balanced.
    pipeline_layout: Optional[list[int]] = None
    # Overlap one micro-batch's MoE all-to-all with another's compute.
    overlap: bool = True
    dispatcher: Dispatcher = Dispatcher.auto  # expert dispatcher
    deepep_num_sms: int = 20
    # EP ranks per node, for node-limited routing and the two-level dispatch (null:
    # the ranks per node of the launch, divided by tp, at most ep). Set it to study
    # node limits on one machine.
    ep_ranks_per_node: Optional[int] = None
    # The alltoall dispatcher's exchange: 1, once to every EP rank holding one of
    # a token's experts; 2, once to every node holding one (to the rank of the
    # same index there), then forwarded inside the node. null: 2 when the EP
    # group spans several nodes (see ep_ranks_per_node), else 1.
    dispatch_hops: Optional[int] = None
    backend: Backend = Backend.auto
    # bf16: gradient sums over replicas travel and add in bf16: half the bytes, for bf16 rounding of every sum.
    grad_reduce_dtype: GradReduceDtype = GradReduceDtype.fp32


@dataclass
class GPUProfile:
    """One GPU of the cluster, for mtrain-plan's cost model (docs/planning.md).
    Peaks are dense (no sparsity); bandwidths in GB/s per GPU and direction,
    as the vendor states them (``efficiency`` says how much of each is reached)."""

    name: Optional[str] = None
    bf16_tflops: Optional[float] = None
    fp8_tflops: Optional[float] = None
    hbm_gib: Optional[float] = None  # memory per GPU
    hbm_gbps: Optional[float] = None  # memory bandwidth
    nvlink_gbps: Optional[float] = None  # to the GPUs of its node
    ib_gbps: Optional[float] = None  # to other nodes (its NIC)
    sms: Optional[int] = None  # streaming multiprocessors (the exchange takes parallel.deepep_num_sms)


@dataclass
class EfficiencyConfig:
    """Fractions of a GPU profile's peaks that real kernels reach (the cost
    model's assumptions, docs/planning.md; a calibration replaces them)."""

    gemm: float = 0.7  # large bf16 GEMMs
    fp8_gemm: float = 0.6  # blockwise-scaled FP8 GEMMs (scales applied every 128 of K)
    attention: float = 0.5  # fused attention, forward and backward
    memory: float = 0.8  # memory-bound ops (norms, activations, optimizer) of HBM bandwidth
    network: float = 0.8  # NVLink and InfiniBand in the all-to-all, p2p and data-parallel collectives


@dataclass
class ClusterConfig:
    # Used to plan without processes; a launched job takes its world size
    # from the launcher instead.
    nodes: int = 1
    gpus_per_node: int = 4
    # Peak dense TFLOP/s of one device in the dtype trained in, for MFU
    # (null: looked up by the CUDA device's name, see mtrain/train/metrics.py).
    peak_tflops: Optional[float] = None
    gpu: GPUProfile = field(default_factory=GPUProfile)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)


@dataclass
class BatchRampConfig:
    """Ramp the global batch up from ``start_size`` to ``train.global_batch_size``
    in steps of ``increment`` sequences spread evenly over the first
    ``ramp_samples`` samples (Megatron's ``--rampup-batch-size``; docs/data.md)."""

    start_size: Optional[int] = None  # null: no ramp
    increment: Optional[int] = None
    ramp_samples: Optional[int] = None


@dataclass
class TrainConfig:
    steps: int = 20
    micro_batch_size: int = 2
    # Sequences per optimizer step (all data-parallel ranks together). null:
    # train.micro_batch_size x parallel.num_microbatches x dp. When set, the
    # micro-batches per data-parallel rank are derived from it, so it stays the
    # same on any layout (docs/data.md).
    global_batch_size: Optional[int] = None
    batch_ramp: BatchRampConfig = field(default_factory=BatchRampConfig)
    seed: int = 1234
    # bf16: bf16 compute with fp32 master weights; auto: bf16 on nccl, fp32 on gloo.
    dtype: Dtype = Dtype.auto
    # blockwise: DeepSeek-V3's FP8 recipe (E4M3, 1x128 activation tiles, 128x128
    # weight blocks; docs/fp8.md) for the GEMMs of the linears and routed experts,
    # with FP8 dispatch payloads.
    fp8: Fp8 = Fp8.none
    # reference: the plain-torch FP8 GEMMs (any device); scaled_mm: torch's blockwise-scaled
    # FP8 matmul on an sm_90 GPU (mtrain/model/fp8_scaled_mm.py).
    fp8_backend: Fp8Backend = Fp8Backend.reference
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_schedule: LrSchedule = LrSchedule.cosine
    warmup_steps: int = 2
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    zero1: bool = True
    # Stop with a checkpoint once the step count is a multiple of this (null: never).
    exit_interval: Optional[int] = None
    max_bad_steps: int = 3  # consecutive NaN/Inf steps before aborting
    # Seconds a collective waits for the other ranks before failing. null: sized
    # to the step (mtrain/parallel/groups.py): collective_timeout_startup_s while
    # the run starts, loads its checkpoint and runs its first 3 steps, then
    # max(collective_timeout_floor_s, 10x the slowest of the last 20 steps,
    # the watchdog's budget + 15 s, so the watchdog names a stopped rank first),
    # and the start-up timeout again around checkpoints, evaluations and the end
    # of the run. A number fixes it for everything.
    collective_timeout_s: Optional[float] = None
    collective_timeout_floor_s: float = 60.0
    collective_timeout_startup_s: float = 1800.0
    # A step running longer is reported on every rank, naming the ranks that did
    # not arrive, with stacks (mtrain/train/watchdog.py). null: 10x the median
    # step, at least 60 s, from the 4th step; 0: off.
    watchdog_s: Optional[float] = None


@dataclass
class DataConfig:
    # Prefix of an indexed dataset (<prefix>.bin / <prefix>.idx); null: the
    # built-in demo corpus.
    path: Optional[str] = None
    # A weighted blend of indexed datasets instead of data.path (null: none):
    # "0.3 /data/a 0.7 /data/b" or [{path: /data/a, weight: 0.3}, ...]; weights
    # are normalised (docs/data.md).
    blend: Any = None
    tokenizer: Optional[str] = None
    seq_len: int = 64
    seed: int = 1234


@dataclass
class LoggingConfig:
    log_interval: int = 10  # console/wandb every N steps; metrics.jsonl gets every step
    progress: bool = True
    wandb: bool = True
    wandb_mode: WandbMode = WandbMode.offline
    wandb_project: str = "mtrain"
    wandb_entity: Optional[str] = None
    tensorboard: bool = False
    heatmap_interval: int = 100  # steps between expert-load heatmaps
    # Record this step's per-rank timeline: Chrome trace JSON (Perfetto) and a
    # PNG drawn like the simulator's, under <run_dir>/trace/ (null: never).
    trace_step: Optional[int] = None


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # null: <run_dir>/checkpoints
    interval: int = 10
    keep_last: int = 2
    async_save: bool = False
    resume: str = "latest"  # latest | none | <path>
    # Start at step 0 although checkpoint.dir holds checkpoints (none verifies, or
    # resume=none); they are set aside as <name>.corrupt|superseded-<time>, never deleted.
    allow_fresh_start: bool = False
    # A save that failed on storage (full disk) leaves the previous checkpoint intact;
    # stop: end the run with one line saying why; continue: warn, retry at the next interval.
    on_save_error: OnSaveError = OnSaveError["stop"]
    # Start a run that has no checkpoint to resume from these weights (model only:
    # fresh optimizer, step 0): a Hugging Face DeepSeek-V2/V3 directory or an
    # mtrain checkpoint directory (docs/hf.md). null: seeded initialisation.
    init_from: Optional[str] = None


@dataclass
class EvalConfig:
    # Held-out evaluation (docs/evaluation.md). Steps between evaluations during
    # training; 0 or null: none (at_end still evaluates once at the end).
    interval: Optional[int] = 0
    steps: int = 10  # global batches per evaluation (the same ones every time)
    # Megatron-style train/valid/test shares of data.path's documents, e.g.
    # "98,1,1" (or 98/1/1 on the command line); training draws from the first
    # part only, evaluation from the second. null: no split, train on everything.
    split: Optional[str] = None
    # A separate indexed dataset prefix to evaluate on (instead of the split's valid part).
    path: Optional[str] = None
    at_end: bool = True  # evaluate after the last step (when there is held-out data)
    # Greedy continuation of this text logged with every evaluation (needs the
    # tokenizer: data.tokenizer or <data.path>.tokenizer.json).
    prompt: Optional[str] = None
    sample_tokens: int = 32


@dataclass
class PlanConfig:
    """mtrain-plan's prediction and layout search (docs/planning.md)."""

    search: bool = False  # rank layouts by predicted throughput (also: mtrain-plan --search)
    top: int = 5  # layouts shown by a search
    # The search space; null: every value that can fit the model and cluster.
    tp: Optional[List[int]] = None
    pp: Optional[List[int]] = None
    ep: Optional[List[int]] = None
    schedules: Optional[List[str]] = None
    recompute: Optional[List[str]] = None
    fp8: Optional[List[str]] = None
    # A step trace (logging.trace_step) whose measured op costs replace the estimates.
    calibrate: Optional[str] = None
    png: Optional[str] = None  # draw the predicted step's timeline here


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/default"
    output: Output = Output.text  # mtrain-plan
    plan: PlanConfig = field(default_factory=PlanConfig)


def register_configs() -> None:
    """Make the schema known to Hydra as ``base_config`` (used by configs/config.yaml)."""
    ConfigStore.instance().store(name="base_config", node=Config)
