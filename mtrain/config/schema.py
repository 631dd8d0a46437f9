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
from typing import Optional

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
GroupedGemm = _choice("GroupedGemm", "auto", "torch", "grouped_mm", "triton")
Dtype = _choice("Dtype", "auto", "fp32", "bf16")  # auto: see resolve_dtype
GradReduceDtype = _choice("GradReduceDtype", "fp32", "bf16")
LrSchedule = _choice("LrSchedule", "cosine", "wsd", "constant")
WandbMode = _choice("WandbMode", "offline", "online", "disabled")
Output = _choice("Output", "text", "json")


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
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
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
    num_microbatches: int = 1
    # Layers per model stage (length = number of model stages); null: balanced.
    pipeline_layout: Optional[list[int]] = None
    # Overlap one micro-batch's MoE all-to-all with another's compute.
    overlap: bool = True
    dispatcher: Dispatcher = Dispatcher.auto  # expert dispatcher
    deepep_num_sms: int = 20
    backend: Backend = Backend.auto
    # bf16: gradient sums over replicas travel and add in bf16: half the bytes, for bf16 rounding of every sum.
    grad_reduce_dtype: GradReduceDtype = GradReduceDtype.fp32


@dataclass
class ClusterConfig:
    # Used to plan without processes; a launched job takes its world size
    # from the launcher instead.
    nodes: int = 1
    gpus_per_node: int = 4
    # Peak dense TFLOP/s of one device in the dtype trained in, for MFU
    # (null: looked up by the CUDA device's name, see mtrain/train/metrics.py).
    peak_tflops: Optional[float] = None


@dataclass
class TrainConfig:
    steps: int = 20
    micro_batch_size: int = 2
    seed: int = 1234
    # bf16: bf16 compute with fp32 master weights; auto: bf16 on nccl, fp32 on gloo.
    dtype: Dtype = Dtype.auto
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
    collective_timeout_s: float = 300.0


@dataclass
class DataConfig:
    # Prefix of an indexed dataset (<prefix>.bin / <prefix>.idx); null: the
    # built-in demo corpus.
    path: Optional[str] = None
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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str = "runs/default"
    output: Output = Output.text  # mtrain-plan


def register_configs() -> None:
    """Make the schema known to Hydra as ``base_config`` (used by configs/config.yaml)."""
    ConfigStore.instance().store(name="base_config", node=Config)
