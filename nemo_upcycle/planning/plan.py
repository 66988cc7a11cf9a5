"""Plan mode: check a Megatron training layout for an upcycled Llama 3 MoE and estimate memory and speed, no GPU.

Arithmetic on sizes only (no NeMo / Megatron import); names are Megatron-core's. Notation: L layers, h hidden,
F dense FFN, Fe expert FFN, a heads, g query groups, d kv_channels, V vocab (padded to a multiple of 128 t as
NeMo's ``get_vocab_size``), E experts, k top-k, s sequence, b micro-batch, m micro-batches per step, t TP, p PP,
v VP, c CP, e EP, et ETP (None = t).

Layout (megatron-core 0.15 parallel_state, model_parallel_config, transformer_config, schedules):
  DP = world/(t p c); expert DP = world/(e et p) (MoE parallel folding: e et | DP t c); a % t = g % t = 0;
  L % p = 0, L % (p v) = 0 (v needs p > 1 and m % p = 0); E % e = 0; Fe % et = 0; GBS % (b DP) = 0;
  s % 2c = 0 if c > 1; sequence parallel needs t > 1 (Megatron raises) and s % (t c) = 0.
Parameters per layer: attention h d (2a + 2g) [/t]; norms 2h and router E h [replicated over t]; experts
  E 3 h Fe (2 h Fe ungated) [/(e et)] or a dense MLP 3 h F [/t]; embedding and output layer V h each [/t]
  (one tensor if tied and p = 1, else Megatron keeps a copy on the last stage). Active: k of E experts.
  Layers go round robin in chunks of L/(p v); embedding on stage 0, output layer and final norm on stage p-1.
Memory per GPU, bytes/param as Megatron's "6 + 12/d" (docs/source/api-guide/dist_optimizer.md,
  megatron/training/theoretical_memory_usage.py): weights 2 (bf16); grads 4 (fp32 main-grad buffer, NeMo's
  grad_reduce_in_fp32=True, not sharded); optimizer 12 (fp32 master + Adam m, v; 8 for fp32 params) / (DP c)
  for dense and / expert DP for expert params with the distributed optimizer. Plus 4 GiB fixed (CUDA context,
  NCCL and all-to-all buffers, TE workspaces, fragmentation).
Activations, Korthikanti et al. 2022 (arXiv 2205.05198): sbh(34 + 5as/h) per layer = attention 11 + norms 4
  + MLP 19 (+ scores 5as/h); 10 sbh replicated over t unless sequence parallel, the rest / t. Adapted:
  attention + norms = 7 replicated + 8 sharded; MLP = 3 replicated + 4F/h sharded (x 3/2 gated: SwiGLU keeps
  2F + F wide tensors; Megatron's "18 + 4F/h"); an MoE layer holds k cap copies of the MLP part (cap =
  capacity factor, 1 dropless; balanced routing, no EP imbalance), sharded part / et. The paper's dropout masks
  (Llama has none) and full-width K, V (GQA keeps g/a of them) stay in: ~10% high for Llama 3 8B shapes.
  Scores only for recompute "none" without flash attention (TE's fused attention keeps none);
  s -> s/c with CP. "selective" drops the scores; "full" keeps 2sbh per layer + one layer's set. Last stage:
  fp32 logits and their input 4sb(h + V/t), one micro-batch. Held at the 1F1B peak (warm-up + 1,
  megatron-core get_pp_rank_microbatches): min(p - r, m) micro-batches of L/p layers on stage r;
  interleaved: min(2(p-r-1) + (v-1)p + 1, m v) chunks of L/(p v) layers.
FLOPs per token, Megatron-LM megatron/training/training.py ``num_floating_point_operations`` (not shipped with
  megatron-core; re-typed): 6 [h (3|2)(F n_dense + Fe k n_moe) + L (h d (a + 2g) + a d s + a d h) + h V]
  (x3 fwd/wgrad/dgrad, x2 per FMA, causal attention half); equals NeMo 2.7.3's flops_formulas.mixtral when
  a d = h and the vocab matches. Tokens/s/GPU = MFU x peak / FLOPs per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd
from typing import NamedTuple, Optional, Union

from nemo_upcycle.errors import UpcycleError

GiB = 1024 ** 3
RECOMPUTE = ("none", "selective", "full")


class GPU(NamedTuple):
    name: str
    memory_bytes: int  # as nvidia-smi reports it
    peak_bf16_flops: float  # dense, no sparsity


GPUS = {"H100": GPU("H100 SXM 80GB", 81559 * 2**20, 989e12), "H200": GPU("H200 141GB", 143771 * 2**20, 989e12),
        "A100": GPU("A100 80GB", 81920 * 2**20, 312e12), "A100-40GB": GPU("A100 40GB", 40960 * 2**20, 312e12)}


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
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        self.num_query_groups = self.num_query_groups or self.num_attention_heads
        self.kv_channels = self.kv_channels or self.hidden_size // self.num_attention_heads
        self.moe_ffn_hidden_size = self.moe_ffn_hidden_size or self.ffn_hidden_size

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


# ---- layout check -------------------------------------------------------------------------------------
class Problem(NamedTuple):
    level: str  # "error" | "warning"
    keys: tuple
    message: str


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def layout_problems(m: ModelDims, par: ParallelLayout, tr: TrainingSetup) -> list[Problem]:
    """Every rule the layout breaks (errors) or should know about (warnings); each names its keys and a fix."""
    t, p, v, c = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.virtual_pipeline_model_parallel_size, par.context_parallel_size)
    e, et, world = par.expert_model_parallel_size, par.etp, par.world_size
    s, b, gbs, L, E, k = (tr.seq_length, tr.micro_batch_size, tr.global_batch_size, m.num_layers,
                          m.num_moe_experts or 0, m.moe_router_topk)
    if min(t, p, c, e, et, world, v or 1, b, gbs) < 1:
        return [Problem("error", (), "every parallel size, the GPU count and the batch sizes must be >= 1.")]
    dp = None if world % (t * p * c) else par.data_parallel_size
    mb = tr.num_microbatches(par) if dp and gbs % (b * dp) == 0 else None
    pattern, TP = m.moe_pattern(), "tensor_model_parallel_size"
    rules = [  # (broken, keys, message with the fix)
        (dp is None, f"num_nodes gpus_per_node {TP} pipeline_model_parallel_size context_parallel_size",
         f"world size {world} (num_nodes x gpus_per_node) is not divisible by tensor_model_parallel_size*"
         f"pipeline_model_parallel_size*context_parallel_size = {t * p * c}; use a multiple of {t * p * c} GPUs."),
        (world % (e * et * p), "expert_model_parallel_size expert_tensor_parallel_size pipeline_model_parallel_size",
         f"expert DP = world {world} / (expert_model_parallel_size*expert_tensor_parallel_size*pipeline_model_"
         f"parallel_size = {e * et * p}) is not an integer (MoE parallel folding: EP*ETP must divide DP*TP*CP = "
         f"world/PP); make EP*ETP a divisor of {world // p if world % p == 0 else world}."),
        (m.num_attention_heads % t or m.num_query_groups % t, f"num_attention_heads num_query_groups {TP}",
         f"tensor_model_parallel_size={t} must divide num_attention_heads={m.num_attention_heads} and num_query_"
         f"groups={m.num_query_groups}; choose TP among {_divisors(gcd(m.num_attention_heads, m.num_query_groups))}."),
        (v is not None and p == 1, "virtual_pipeline_model_parallel_size pipeline_model_parallel_size",
         "virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1; set it to None."),
        (v is not None and p > 1 and L % (p * v), "num_layers pipeline_model_parallel_size "
         "virtual_pipeline_model_parallel_size", f"num_layers={L} is not divisible by pipeline_model_parallel_size*"
         f"virtual_pipeline_model_parallel_size = {p * (v or 1)}; choose PP*VP among {_divisors(L)}."),
        (v is None and L % p, "num_layers pipeline_model_parallel_size", f"pipeline_model_parallel_size={p} does "
         f"not divide num_layers={L}; choose PP among {_divisors(L)}."),
        (v is not None and p > 1 and mb and mb % p, "global_batch_size virtual_pipeline_model_parallel_size",
         f"the interleaved schedule needs micro-batches per step GBS/(MBS*DP) = {mb}, a multiple of pipeline_model_"
         f"parallel_size={p}; change global_batch_size, or set virtual_pipeline_model_parallel_size=None."),
        (E and E % e, "num_moe_experts expert_model_parallel_size", f"expert_model_parallel_size={e} does not "
         f"divide num_moe_experts={E}; choose EP among {_divisors(max(E, 1))}."),
        (E and m.moe_ffn_hidden_size % et, "moe_ffn_hidden_size expert_tensor_parallel_size",
         f"expert_tensor_parallel_size={et} does not divide moe_ffn_hidden_size={m.moe_ffn_hidden_size}."),
        (E and not 1 <= k <= E, "moe_router_topk num_moe_experts", f"moe_router_topk={k} must be in 1..{E}."),
        (len(pattern) != L, "moe_layer_freq num_layers", f"moe_layer_freq lists {len(pattern)} layers, not {L}."),
        (not E and e > 1, "expert_model_parallel_size num_moe_experts", "EP > 1 needs num_moe_experts; set EP=1."),
        (not all(pattern) and m.ffn_hidden_size % t, f"ffn_hidden_size {TP}", f"tensor_model_parallel_size={t} "
         f"does not divide ffn_hidden_size={m.ffn_hidden_size} of the dense layers; choose a divisor."),
        (dp and gbs % (b * dp), "global_batch_size micro_batch_size", f"global_batch_size={gbs} is not divisible "
         f"by micro_batch_size*DP = {b}*{dp}; use a multiple of {b * (dp or 1)}."),
        (c > 1 and s % (2 * c), "seq_length context_parallel_size", f"seq_length={s} is not divisible by "
         f"2*context_parallel_size = {2 * c} (load-balanced CP chunks); pad the sequence or change CP."),
        (par.sequence_parallel and t == 1, f"sequence_parallel {TP}", "sequence_parallel needs tensor_model_"
         "parallel_size > 1 (megatron-core raises 'Cannot use sequence parallelism without tensor parallelism')."),
        (par.sequence_parallel and t > 1 and s % (t * c), "seq_length sequence_parallel", f"sequence_parallel "
         f"splits seq_length={s} over tensor_model_parallel_size*context_parallel_size; use a multiple of {t * c}."),
        (tr.recompute not in RECOMPUTE, "recompute", f"recompute={tr.recompute!r}: choose one of {RECOMPUTE}."),
    ]
    out = [Problem("error", tuple(keys.split()), msg) for broken, keys, msg in rules if broken]
    if t > 1 and not par.sequence_parallel:
        out.append(Problem("warning", ("sequence_parallel",), "TP > 1 without sequence_parallel keeps 10sbh per "
                           "layer unsharded (Megatron also warns EP with TP needs it); set sequence_parallel=True."))
    return out


def check_layout(m: ModelDims, par: ParallelLayout, tr: TrainingSetup) -> list[str]:
    """Raise ``UpcycleError`` listing every broken rule; return the warnings."""
    problems = layout_problems(m, par, tr)
    if errors := [x.message for x in problems if x.level == "error"]:
        raise UpcycleError(f"{len(errors)} layout problem(s): " + " | ".join(errors))
    return [x.message for x in problems if x.level == "warning"]


# ---- parameters ----------------------------------------------------------------------------------------
def layer_parameters(m: ModelDims, moe: bool) -> dict[str, int]:
    """One layer: attention (TP-sharded), replicated (norms, router), mlp (TP-sharded), experts (all E)."""
    h, w = m.hidden_size, 3 if m.gated_linear_unit else 2
    attention = h * m.kv_channels * 2 * (m.num_attention_heads + m.num_query_groups)
    if moe:
        return {"attention": attention, "replicated": 2 * h + m.num_moe_experts * h, "mlp": 0,
                "experts": m.num_moe_experts * w * h * m.moe_ffn_hidden_size}
    return {"attention": attention, "replicated": 2 * h, "mlp": w * h * m.ffn_hidden_size, "experts": 0}


def parameter_counts(m: ModelDims, tp: Optional[int] = None) -> dict[str, int]:
    """total, active (k routed experts), experts, embedding; vocab as given, or padded for ``tp``."""
    layers = [layer_parameters(m, moe) for moe in m.moe_pattern()]
    experts, emb = sum(lp["experts"] for lp in layers), m.padded_vocab(tp) * m.hidden_size
    total = (sum(sum(lp.values()) for lp in layers) + m.hidden_size
             + emb * (1 if m.share_embeddings_and_output_weights else 2))
    active = total - experts + (experts * m.moe_router_topk // m.num_moe_experts if m.num_moe_experts else 0)
    return {"total": total, "active": active, "experts": experts, "embedding": emb}


def stage_layers(num_layers: int, pp: int, vp: Optional[int] = None) -> list[list[int]]:
    """Layer indices per PP stage: chunks of L/(p v) layers, chunk j on stage j % p (Megatron's interleaving)."""
    v, n = vp or 1, num_layers // (pp * (vp or 1))
    return [[(k * pp + r) * n + i for k in range(v) for i in range(n)] for r in range(pp)]


def rank_parameters(m: ModelDims, par: ParallelLayout) -> list[dict]:
    """Per PP stage, what one GPU holds: sharded (its TP shard of attention, dense MLP, vocab), replicated (same
    on every TP rank: norms, routers), dense = sharded + replicated, expert (its EP*ETP share), layers (indices)."""
    t, p = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    pattern, emb, out = m.moe_pattern(), m.padded_vocab(t) * m.hidden_size, []
    for r, layers in enumerate(stage_layers(m.num_layers, p, par.virtual_pipeline_model_parallel_size)):
        lps = [layer_parameters(m, pattern[i]) for i in layers]
        sh = sum(lp["attention"] + lp["mlp"] for lp in lps) + (emb if r == 0 else 0)
        rep = sum(lp["replicated"] for lp in lps) + (m.hidden_size if r == p - 1 else 0)  # final norm
        if r == p - 1 and (p > 1 or not m.share_embeddings_and_output_weights):
            sh += emb  # output layer (a tied copy when p > 1)
        ex = sum(lp["experts"] for lp in lps) // (par.expert_model_parallel_size * par.etp)
        out.append({"stage": r, "layers": layers, "sharded": sh // t, "replicated": rep, "expert": ex,
                    "dense": sh // t + rep})
    return out


# ---- memory --------------------------------------------------------------------------------------------
def layer_activation_bytes(m: ModelDims, par: ParallelLayout, tr: TrainingSetup, moe: bool) -> float:
    """Bytes one layer keeps for the backward of one micro-batch (selective set; + scores for unfused "none")."""
    t, h, s_loc = par.tensor_model_parallel_size, m.hidden_size, tr.seq_length / par.context_parallel_size
    tsp, sbh, w = t if par.sequence_parallel else 1, s_loc * tr.micro_batch_size * h, 1.5 if m.gated_linear_unit else 1
    attn = sbh * (7 / tsp + 8 / t)
    if tr.recompute == "none" and not tr.flash_attention:
        attn += 5 * m.num_attention_heads * s_loc * tr.seq_length * tr.micro_batch_size / t
    if moe:
        copies = m.moe_router_topk * max(1.0, m.moe_expert_capacity_factor or 1.0)
        return attn + copies * sbh * (3 / tsp + 4 * m.moe_ffn_hidden_size * w / (h * par.etp))
    return attn + sbh * (3 / tsp + 4 * m.ffn_hidden_size * w / (h * t))


def in_flight_layers(num_layers: int, par: ParallelLayout, num_microbatches: int, stage: int) -> int:
    """Layer-activations stage ``stage`` holds at its 1F1B peak (warm-up forwards + 1)."""
    p, v = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    if v is None:
        return min(p - stage, num_microbatches) * (num_layers // p)
    return min(2 * (p - stage - 1) + (v - 1) * p + 1, num_microbatches * v) * (num_layers // (p * v))


def stage_memory(m: ModelDims, par: ParallelLayout, tr: TrainingSetup, sp: dict) -> dict:
    """Bytes on one GPU of stage ``sp`` (a ``rank_parameters`` entry): the five parts, their total, layers held."""
    t, n, opt = par.tensor_model_parallel_size, sp["dense"] + sp["expert"], 12 if tr.bf16 else 8
    dense_shards = par.data_parallel_size * par.context_parallel_size if tr.use_distributed_optimizer else 1
    expert_shards = par.expert_data_parallel_size if tr.use_distributed_optimizer else 1
    per_layer = [layer_activation_bytes(m, par, tr, m.moe_pattern()[i]) for i in sp["layers"]]
    held = in_flight_layers(m.num_layers, par, tr.num_microbatches(par), sp["stage"])
    sb, tsp = tr.seq_length / par.context_parallel_size * tr.micro_batch_size, t if par.sequence_parallel else 1
    if tr.recompute == "full":  # layer inputs kept, one layer recomputed at a time
        act = held * 2 * sb * m.hidden_size / tsp + max(per_layer)
    else:
        act = held * sum(per_layer) / len(per_layer)
    if sp["stage"] == par.pipeline_model_parallel_size - 1:  # fp32 logits and the output layer's input
        act += 4 * sb * (m.hidden_size / tsp + m.padded_vocab(t) / t)
    parts = {"weights": (2 if tr.bf16 else 4) * n, "gradients": (4 if tr.grad_reduce_in_fp32 or not tr.bf16 else 2) * n,
             "optimizer": round(opt * sp["dense"] / dense_shards + opt * sp["expert"] / expert_shards),
             "activations": round(act), "overhead": tr.overhead_bytes}
    return {"stage": sp["stage"], **parts, "total": sum(parts.values()), "in_flight_layers": held}


# ---- FLOPs ---------------------------------------------------------------------------------------------
def flops_per_token(m: ModelDims, seq_length: int, tp: Optional[int] = None) -> float:
    """Megatron's model FLOPs (fwd + bwd) per token: k routed experts, causal attention, logits."""
    h, d, a, g, L = m.hidden_size, m.kv_channels, m.num_attention_heads, m.num_query_groups, m.num_layers
    n_moe, w = sum(m.moe_pattern()), 3 if m.gated_linear_unit else 2
    mlp = h * w * (m.ffn_hidden_size * (L - n_moe) + m.moe_ffn_hidden_size * m.moe_router_topk * n_moe)
    attn = L * (h * d * (a + 2 * g) + a * d * seq_length + a * d * h)
    return 6.0 * (mlp + attn + h * m.padded_vocab(tp))


# ---- the plan ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    model: ModelDims
    parallel: ParallelLayout
    training: TrainingSetup
    gpu: GPU
    warnings: list
    counts: dict  # parameter_counts (unpadded vocab: the HF / Mixtral numbers)
    stages: list  # rank_parameters: per PP stage
    memory: list  # stage_memory: per PP stage
    peak: dict  # the fullest stage's memory
    fits: bool  # peak total <= gpu.memory_bytes
    flops_per_token: float
    mfu: float
    tokens_per_s_per_gpu: float  # mfu * peak FLOP/s / flops_per_token
    step_seconds: float


def plan(m: ModelDims, par: ParallelLayout, tr: TrainingSetup, gpu: Union[str, GPU] = "H100",
         mfu: float = 0.468) -> Plan:
    """Check the layout (raises ``UpcycleError``), then count, size and time it. 46.8% = arXiv 2412.09952's MFU."""
    if isinstance(gpu, str) and gpu not in GPUS:
        raise UpcycleError(f"unknown gpu {gpu!r}; choose one of {', '.join(GPUS)} or pass a GPU(...).")
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    warnings = check_layout(m, par, tr)
    stages = rank_parameters(m, par)
    memory = [stage_memory(m, par, tr, s) for s in stages]
    peak = max(memory, key=lambda x: x["total"])
    flops = flops_per_token(m, tr.seq_length, par.tensor_model_parallel_size)
    tps = mfu * gpu.peak_bf16_flops / flops
    return Plan(m, par, tr, gpu, warnings, parameter_counts(m), stages, memory, peak, peak["total"] <= gpu.memory_bytes,
                flops, mfu, tps, tr.global_batch_size * tr.seq_length / (tps * par.world_size))


def format_plan(pl: Plan) -> str:
    """A readable text table of the plan: one row per PP stage, memory in GiB."""
    par, tr, gpu, c, vp = pl.parallel, pl.training, pl.gpu, pl.counts, pl.parallel.virtual_pipeline_model_parallel_size
    free, keys = (gpu.memory_bytes - pl.peak["total"]) / GiB, ("weights", "gradients", "optimizer", "activations")
    rows = [("stage", "layers", "dense/GPU", "expert/GPU", *keys, "in flight", "overhead", "total GiB")] + [
        (sp["stage"], len(sp["layers"]), f"{sp['dense'] / 1e9:.3f} B", f"{sp['expert'] / 1e9:.3f} B",
         *(f"{x[k] / GiB:.2f}" for k in keys), f"{x['in_flight_layers']} layers", f"{x['overhead'] / GiB:.2f}",
         f"{x['total'] / GiB:.2f}") for sp, x in zip(pl.stages, pl.memory)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join([
        f"GPUs     {par.num_nodes} nodes x {par.gpus_per_node} {gpu.name} = {par.world_size}: TP"
        f"{par.tensor_model_parallel_size} PP{par.pipeline_model_parallel_size}{f' VP{vp}' if vp else ''} "
        f"CP{par.context_parallel_size} EP{par.expert_model_parallel_size} ETP{par.etp} "
        f"SP {'on' if par.sequence_parallel else 'off'}; DP {par.data_parallel_size}, "
        f"expert DP {par.expert_data_parallel_size}",
        f"batch    seq {tr.seq_length}, micro {tr.micro_batch_size}, global {tr.global_batch_size} -> "
        f"{tr.num_microbatches(par)} micro-batches/step; recompute {tr.recompute}; "
        f"{'distributed' if tr.use_distributed_optimizer else 'replicated'} optimizer; "
        f"{'bf16 + fp32 master' if tr.bf16 else 'fp32'}; {'flash' if tr.flash_attention else 'unfused'} attention",
        f"params   total {c['total'] / 1e9:.2f} B, active {c['active'] / 1e9:.2f} B (top-{pl.model.moe_router_topk} "
        f"of {pl.model.num_moe_experts} experts), experts {c['experts'] / 1e9:.2f} B", "",
    ] + ["  ".join(str(v).rjust(w) for v, w in zip(r, widths)) for r in rows] + [
        "",
        f"memory   peak {pl.peak['total'] / GiB:.2f} GiB (stage {pl.peak['stage']}) of {gpu.memory_bytes / GiB:.2f}"
        + (f" GiB: FITS ({free:.2f} GiB free)" if pl.fits else f" GiB: DOES NOT FIT ({-free:.2f} GiB over)"),
        f"FLOPs    {pl.flops_per_token / 1e9:.2f} GFLOP/token (Megatron num_floating_point_operations, fwd + bwd)",
        f"speed    {pl.mfu:.1%} MFU of {gpu.peak_bf16_flops / 1e12:.0f} TFLOP/s -> {pl.tokens_per_s_per_gpu:,.0f} "
        f"tokens/s/GPU, {pl.tokens_per_s_per_gpu * par.world_size:,.0f} tokens/s in all, {pl.step_seconds:.2f} s/step",
    ] + [f"warning  {w}" for w in pl.warnings])

