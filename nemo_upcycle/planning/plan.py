"""Plan mode: a Megatron training layout for an upcycled Llama 3 MoE checked (``layout``), counted, sized and timed,
no GPU.

Arithmetic on sizes only (no NeMo / Megatron / torch import); names are Megatron-core's. Notation: L layers, h hidden,
F dense FFN, Fe expert FFN, a heads, g query groups, d kv_channels, V vocab (padded to a multiple of 128 t as
NeMo's ``get_vocab_size``), E experts, k top-k, s sequence, b micro-batch, m micro-batches per step, t TP, p PP,
v VP, c CP, e EP, et ETP (None = t).

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
Speed: FLOPs per token and tokens/s at an MFU (``flops``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.planning.flops import GPU, GPUS, flops_per_token, tokens_per_s
from nemo_upcycle.planning.layout import GiB, ModelDims, ParallelLayout, TrainingSetup, check_layout


# ---- parameters ----------------------------------------------------------------------------------------
def layer_parameters(m: ModelDims, moe: bool) -> dict[str, int]:
    """One layer: attention (TP-sharded), replicated (norms, router), mlp (TP-sharded), experts (all E)."""
    h, w = m.hidden_size, 3 if m.gated_linear_unit else 2
    attention = h * m.kv_channels * 2 * (m.num_attention_heads + m.num_query_groups)
    if moe:
        Fs = m.moe_shared_expert_intermediate_size or 0  # the shared expert: a TP-sharded MLP (+ its gate, if any)
        return {"attention": attention, "replicated": 2 * h + m.num_moe_experts * h, "mlp": w * h * Fs,
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
    tps = tokens_per_s(mfu, flops, gpu.peak_bf16_flops)
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

