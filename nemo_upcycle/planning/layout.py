"""The one home of the Megatron layout rules: what a model, its parallel sizes and its batch must satisfy.

Names are Megatron-core's; notation: L layers, F dense FFN, Fe expert FFN, a heads, g query groups, E experts,
k top-k, s sequence, b micro-batch, m micro-batches per step, t TP, p PP, v VP, c CP, e EP, et ETP (None = t).
Rules (megatron-core parallel_state, model_parallel_config, transformer_config, schedules):
  on any number of GPUs: a % t = g % t = 0; L % p = 0, L % (p v) = 0 (v needs p > 1); E % e = 0; Fe % et = 0;
  F % t = 0 for dense layers; 1 <= k <= E (the core's rule, ``core.options.topk_error``); sequence parallel needs t > 1;
  for the job: DP = world/(t p c) and expert DP = world/(e et p) are integers (MoE parallel folding: e et | DP t c);
  GBS % (b DP) = 0; m % p = 0 when interleaved; s % 2c = 0 if c > 1; s % (t c) = 0 with sequence parallel.
Each broken rule is a ``Problem`` whose template names its fields (``errors.FieldError``), so schema validation
(``config.validate``: Hydra keys), plan mode and the engine (Megatron names) render it by their own names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from math import gcd
from typing import NamedTuple, Optional, Union

from nemo_upcycle.core.options import topk_error
from nemo_upcycle.errors import FieldError

GiB = 1024 ** 3
RECOMPUTE = ("none", "selective", "full")


@dataclass
class ModelDims:
    """The sizes that matter (Megatron / NeMo config names); ``None`` sizes are filled in."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    num_query_groups: Optional[int] = None  # None: num_attention_heads
    kv_channels: Optional[int] = None  # None: hidden_size // num_attention_heads
    share_embeddings_and_output_weights: bool = False
    gated_linear_unit: bool = True
    num_moe_experts: Optional[int] = 8
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # None: ffn_hidden_size
    moe_layer_freq: Union[int, list] = 1
    moe_expert_capacity_factor: Optional[float] = None  # None: dropless
    moe_shared_expert_intermediate_size: Optional[int] = None  # Megatron's SharedExpertMLP (TP-sharded, every token)
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        self.num_query_groups = self.num_query_groups or self.num_attention_heads
        self.kv_channels = self.kv_channels or self.hidden_size // self.num_attention_heads
        self.moe_ffn_hidden_size = self.moe_ffn_hidden_size or self.ffn_hidden_size

    @classmethod
    def from_config(cls, cfg, **overrides) -> "ModelDims":
        """From any object with these attribute names (a NeMo / Megatron config; None means what it means there)."""
        kw = {**{f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}, **overrides}
        return cls(**kw)

    def moe_pattern(self) -> list[bool]:
        """Which layers are MoE (Megatron: int f -> layer i iff i % f == 0; a list gives 1/0 per layer)."""
        f = self.moe_layer_freq
        if not self.num_moe_experts:
            return [False] * self.num_layers
        return [i % f == 0 for i in range(self.num_layers)] if isinstance(f, int) else [bool(x) for x in f]

    def padded_vocab(self, tp: Optional[int] = None) -> int:
        mult = self.make_vocab_size_divisible_by * (tp or 1)
        return self.vocab_size if tp is None else -(-self.vocab_size // mult) * mult


@dataclass
class ParallelLayout:
    """Where the GPUs go (``MegatronStrategy`` names) and how many there are."""

    num_nodes: int = 1
    gpus_per_node: int = 8
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # None: tensor_model_parallel_size
    sequence_parallel: bool = False
    etp: int = field(init=False)  # expert_tensor_parallel_size, resolved
    world_size: int = field(init=False)  # num_nodes * gpus_per_node
    data_parallel_size: int = field(init=False)  # world / (TP PP CP)
    expert_data_parallel_size: int = field(init=False)  # world / (EP ETP PP)

    def __post_init__(self):
        t, p, e = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.expert_model_parallel_size
        self.etp = self.expert_tensor_parallel_size or t
        self.world_size = self.num_nodes * self.gpus_per_node
        self.data_parallel_size = self.world_size // max(1, t * p * self.context_parallel_size)
        self.expert_data_parallel_size = self.world_size // max(1, e * self.etp * p)


@dataclass
class TrainingSetup:
    """Batch, recompute and precision (Megatron / NeMo names where they exist)."""

    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 256
    recompute: str = "selective"  # none | selective | full (Megatron recompute_granularity; None = "none")
    bf16: bool = True  # bf16 params with fp32 master weights; False: fp32 params, no master copy
    use_distributed_optimizer: bool = True
    grad_reduce_in_fp32: bool = True
    flash_attention: bool = True  # TE fused attention stores no s x s scores (spec_backend "local": False)
    overhead_bytes: int = 4 * GiB

    def num_microbatches(self, par: ParallelLayout) -> int:
        return self.global_batch_size // (self.micro_batch_size * par.data_parallel_size)


class Problem(NamedTuple):
    """A broken rule (``level`` "error") or a note (``warning``): its message template and the values it names."""

    level: str
    template: str
    values: dict

    @property
    def keys(self) -> tuple:
        """The fields the message names."""
        return FieldError(self.template, **self.values).fields

    @property
    def message(self) -> str:
        """The message with Megatron's names."""
        return str(FieldError(self.template, **self.values))


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _problems(level: str, rules: list, values: dict) -> list[Problem]:
    """The broken rules of ``rules`` [(broken, template)], each with the values of the fields it names."""
    out = []
    for broken, template in rules:
        if broken:
            named = FieldError(template, **values).fields
            out.append(Problem(level, template, {k: values[k] for k in named}))
    return out


def _values(m: ModelDims, par: ParallelLayout, tr: Optional[TrainingSetup] = None) -> dict:
    out = {f.name: getattr(m, f.name) for f in fields(m)}
    out.update({f.name: getattr(par, f.name) for f in fields(par) if f.init})
    out["expert_tensor_parallel_size"] = par.etp
    if tr is not None:
        out.update({f.name: getattr(tr, f.name) for f in fields(tr)})
    return out


def model_problems(m: ModelDims, par: ParallelLayout) -> list[Problem]:
    """The rules between the model's sizes and the parallel sizes, true on any number of GPUs (what Megatron checks
    when it builds the model)."""
    t, p, v, c = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.virtual_pipeline_model_parallel_size, par.context_parallel_size)
    e, et, L, E, values = par.expert_model_parallel_size, par.etp, m.num_layers, m.num_moe_experts or 0, _values(m, par)
    if min(t, p, c, e, et, v or 1) < 1:
        return [Problem("error", "every parallel size must be >= 1.", {})]
    pattern, tp_choices = m.moe_pattern(), _divisors(gcd(m.num_attention_heads, m.num_query_groups))
    topk = topk_error(E, m.moe_router_topk) if E else None
    return ([Problem("error", topk.template, topk.values)] if topk else []) + _problems("error", [
        (m.num_attention_heads % t, "{tensor_model_parallel_size=} does not divide {num_attention_heads=}; "
         f"choose TP among {tp_choices}."),
        (m.num_query_groups % t, "{tensor_model_parallel_size=} does not divide {num_query_groups=}; "
         f"choose TP among {tp_choices}."),
        (v is not None and p == 1, "{virtual_pipeline_model_parallel_size} needs {pipeline_model_parallel_size} > 1; "
         "set it to None."),
        (v is not None and p > 1 and L % (p * v), "{num_layers=} is not divisible by {pipeline_model_parallel_size}*"
         f"{{virtual_pipeline_model_parallel_size}} = {p * (v or 1)}; choose PP*VP among {_divisors(L)}."),
        (v is None and L % p, f"{{pipeline_model_parallel_size=}} does not divide {{num_layers=}}; choose PP among "
         f"{_divisors(L)}."),
        (E and E % e, "{expert_model_parallel_size=} does not divide {num_moe_experts=}; choose EP among "
         f"{_divisors(max(E, 1))}."),
        (E and m.moe_ffn_hidden_size % et, "{expert_tensor_parallel_size=} does not divide {moe_ffn_hidden_size=}."),
        (len(pattern) != L, f"{{moe_layer_freq}} lists {len(pattern)} layers, not {{num_layers=}}."),
        (not E and e > 1, "{expert_model_parallel_size=} needs experts ({num_moe_experts} is not set); set it to 1."),
        (not all(pattern) and m.ffn_hidden_size % t, "{tensor_model_parallel_size=} does not divide "
         "{ffn_hidden_size=} of the dense layers; choose a divisor."),
        (par.sequence_parallel and t == 1, "{sequence_parallel} needs {tensor_model_parallel_size} > 1 (megatron-core "
         "raises 'Cannot use sequence parallelism without tensor parallelism')."),
        (E and t > 1 and not par.sequence_parallel, "MoE layers with {tensor_model_parallel_size=} need "
         "{sequence_parallel}=true (megatron-core refuses MoE with tensor parallelism otherwise, and with expert "
         "parallelism 0.15.3 fails inside model_parallel_config.py); set {sequence_parallel}=true."),
    ], values)


def job_problems(m: ModelDims, par: ParallelLayout, tr: TrainingSetup) -> list[Problem]:
    """The rules of the job: its GPU count, batch and sequence against the parallel sizes."""
    t, p, v, c = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.virtual_pipeline_model_parallel_size, par.context_parallel_size)
    e, et, world, s, b, gbs = (par.expert_model_parallel_size, par.etp, par.world_size, tr.seq_length,
                               tr.micro_batch_size, tr.global_batch_size)
    if min(t, p, c, e, et, world, v or 1, b, gbs) < 1:
        return [Problem("error", "every parallel size, the GPU count and the batch sizes must be >= 1.", {})]
    dp = None if world % (t * p * c) else par.data_parallel_size
    mb = tr.num_microbatches(par) if dp and gbs % (b * dp) == 0 else None
    TPC = "{tensor_model_parallel_size}*{context_parallel_size}"
    return _problems("error", [
        (dp is None, f"world size {world} ({{num_nodes}} x {{gpus_per_node}}) is not divisible by "
         f"{{tensor_model_parallel_size}}*{{pipeline_model_parallel_size}}*{{context_parallel_size}} = {t * p * c}; "
         f"use a multiple of {t * p * c} GPUs."),
        (world % (e * et * p), f"expert DP = world {world} / ({{expert_model_parallel_size}}*"
         f"{{expert_tensor_parallel_size}}*{{pipeline_model_parallel_size}} = {e * et * p}) is not an integer (MoE "
         f"parallel folding: EP*ETP must divide DP*TP*CP = world/PP); make EP*ETP a divisor of "
         f"{world // p if world % p == 0 else world}."),
        (v is not None and p > 1 and mb and mb % p, f"the interleaved schedule needs micro-batches per step "
         f"GBS/(MBS*DP) = {mb}, a multiple of {{pipeline_model_parallel_size=}}; change {{global_batch_size}}, or set "
         "{virtual_pipeline_model_parallel_size}=None."),
        (dp and gbs % (b * dp), f"{{global_batch_size=}} is not divisible by {{micro_batch_size}}*DP = {b}*{dp}; use "
         f"a multiple of {b * (dp or 1)}."),
        (c > 1 and s % (2 * c), f"{{seq_length=}} is not divisible by 2*{{context_parallel_size}} = {2 * c} "
         "(load-balanced CP chunks); pad the sequence or change CP."),
        (par.sequence_parallel and t > 1 and s % (t * c), f"{{sequence_parallel}} splits {{seq_length=}} over {TPC}; "
         f"use a multiple of {t * c}."),
        (tr.recompute not in RECOMPUTE, f"{{recompute=}}: choose one of {RECOMPUTE}."),
    ], _values(m, par, tr))


def layout_problems(m: ModelDims, par: ParallelLayout, tr: TrainingSetup) -> list[Problem]:
    """Every rule the layout breaks (errors) or should know about (warnings); each names its fields and a fix."""
    out = model_problems(m, par) + job_problems(m, par, tr)
    out += _problems("warning", [
        (par.tensor_model_parallel_size > 1 and not par.sequence_parallel and not m.num_moe_experts,
         "TP > 1 without {sequence_parallel} keeps "
         "10sbh per layer unsharded (Megatron also warns EP with TP needs it); set {sequence_parallel}=True."),
    ], _values(m, par, tr))
    return out


def check_layout(m: ModelDims, par: ParallelLayout, tr: Optional[TrainingSetup] = None) -> list[str]:
    """Raise ``FieldError`` listing every broken rule; return the warnings. Without ``tr``, only the rules that hold
    on any number of GPUs (``model_problems``)."""
    problems = layout_problems(m, par, tr) if tr is not None else model_problems(m, par)
    if errors := [x for x in problems if x.level == "error"]:
        values = {k: v for x in errors for k, v in x.values.items()}
        raise FieldError(f"{len(errors)} layout problem(s): " + " | ".join(x.template for x in errors), **values)
    return [x.message for x in problems if x.level == "warning"]
