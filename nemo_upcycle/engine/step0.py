"""The step-0 check at any layout: every rank's MoE layers against the dense MLP they were upcycled from.

Run by ``engine.lifecycle`` on every rank at the start of an online-upcycled run (a collective: the ranks of one
pipeline stage call the same layers in the same order). For each MoE layer a rank holds (PP / VP stages give their
own layers; ``MoELayer.layer_number`` is global):

  output   seeded hidden states x [S, B, D] (RMS-normed with the dense ``post_attention_layernorm`` weight, as the
           layer's real input is), this rank's sequence chunk under sequence / context parallelism, go through the
           layer's own forward (``megatron/core/transformer/moe/moe_layer.py``: router, token dispatch with the
           expert-parallel exchange, experts, combine) and through the dense MLP read from the source
           (``formats.base.read_dense_mlp``: only that layer's gate / up / down).
  router   the router's logits on x against the router upcycling promised (``core.upcycle.router_weight``).
  experts  each local expert's output inside that forward (a hook on ``experts``: ``SequentialMLP`` or TE's
           grouped GEMM), on the tokens dispatched to it and times their routing probabilities, against the expert
           ``core.upcycle.expert_weights`` builds from the dense MLP (an expert no token reached runs on the first
           ``EXPERT_TOKENS`` rows of x); under expert-tensor parallelism this rank's shard of the intermediate units
           (a partial sum, as ``formats.keymap.shard`` cuts it), so a wrong shard names its rank.

The reference runs in fp32 on the module's device with the source weights rounded to the module's dtype; a bf16 /
fp16 module is checked on fp32 copies of its weights (``in_fp32``), so the fp32 tolerance applies to what trains. Each
comparison passes when max |difference| <= ``rtol`` x max |reference| (``STEP0_MLP_RTOL`` by dtype; see there).
Rank 0 gathers the per-rank records (``summarize``) into the ``layers`` block of ``step0.json``: one row per layer,
and every failing (layer, expert, rank) under ``mismatches``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from nemo_upcycle.core.options import UpcycleOptions, step0_report
from nemo_upcycle.core.plan import UpcyclePlan
from nemo_upcycle.core.upcycle import expert_weights
from nemo_upcycle.formats.base import open_dense, read_dense_mlp
from nemo_upcycle.formats.keymap import POST_ATTN_NORM, shard

# max |MoE - reference| / max |reference| (per layer output, router logits, expert output) at which the MoE still
# computes what upcycling promised. fp32: the two sides differ by rounding only -- the k routing weights sum to 1 up to
# an ulp, and each GEMM sums F (or D) products in its own order (another row count, another kernel blocking), about
# sqrt(F) x 2^-24 relative: 2.3e-6 at F = 1536 (SmolLM2), 7e-6 at 14336 (Llama 3 8B) as a worst case; measured up to
# 4.3e-7 (tiny recipe, every layout) and 6.8e-7 (SmolLM2-sized layers). One expert's weights changed by 1e-4
# relative is caught (tests/test_step0_layouts.py). bf16 / fp16 (GPU runs; not measured here): each rounding of an
# activation costs up to 2^-9 / 2^-12 relative, a few of them in series.
STEP0_MLP_RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
CHECK_TOKENS = 64  # hidden states per layer over all ranks of a stage (rounded up to a multiple of TP x CP)
EXPERT_TOKENS = 8  # rows an expert no token reached computes: a change of its weights shows on any few tokens


def rtol_for(dtype: torch.dtype) -> float:
    return STEP0_MLP_RTOL.get(dtype, STEP0_MLP_RTOL[torch.float32])


def moe_layers(roots: Iterable[torch.nn.Module]) -> list:
    """The MoE layers (``BaseMoELayer``) under ``roots`` (every virtual-pipeline chunk), once each, by global layer."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    found = {}
    for root in roots:
        for m in root.modules():
            if isinstance(m, BaseMoELayer) and m.layer_number is not None:
                found.setdefault(id(m), m)
    return sorted(found.values(), key=lambda m: m.layer_number)


def check_input(layer: int, hidden: int, norm_weight: torch.Tensor, eps: float, tokens: int,
                seed: int) -> torch.Tensor:
    """Seeded hidden states [tokens, 1, hidden] after the layer's pre-MLP RMSNorm (fp32, CPU): the same at every
    layout, so one layer's results agree across runs."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + layer)
    h = torch.randn(tokens, 1, hidden, generator=g)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()


def local_rows(x: torch.Tensor, config) -> torch.Tensor:
    """This rank's sequence chunk of x [S, B, D]: split over CP, and over TP under sequence parallelism."""
    from megatron.core import parallel_state as ps

    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    n, i = cp, cp_rank
    if config.sequence_parallel and tp > 1:
        n, i = cp * tp, cp_rank * tp + tp_rank
    S = x.shape[0] // n
    return x[i * S:(i + 1) * S]


def dense_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The Llama MLP (SwiGLU): down(silu(gate x) * up x)."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got - ref|, max |ref|) in fp32."""
    got, ref = got.float(), ref.float()
    return (got - ref).abs().max().item(), ref.abs().max().item()


@torch.no_grad()
def check_layer(moe, opts: UpcycleOptions, get, seed: int = 0, weights_dtype: Optional[torch.dtype] = None,
                plan: Optional[UpcyclePlan] = None, expert_gets: Optional[list] = None) -> dict:
    """This rank's record for one MoE layer (collective over its TP / EP / ETP groups: the layer's forward).
    ``weights_dtype``: the dtype the weights were rounded to when the module runs on fp32 copies (``in_fp32``);
    ``plan``: the splits and routers upcycling learnt from data (``core.plan``), as the filler used them;
    ``expert_gets``: several dense sources (``core.sources``): each expert is checked against its own source's MLP."""
    plan = plan if plan is not None else UpcyclePlan()
    from megatron.core import parallel_state as ps

    t0 = time.perf_counter()
    config, layer = moe.config, moe.layer_number - 1
    p = next(moe.parameters())
    dev, dt = p.device, p.dtype
    wdt = weights_dtype or dt
    cp_tp = ps.get_context_parallel_world_size() * ps.get_tensor_model_parallel_world_size()
    tokens = -(-CHECK_TOKENS // cp_tp) * cp_tp
    x_full = check_input(layer, config.hidden_size, get(POST_ATTN_NORM.key(layer)), config.layernorm_epsilon,
                         tokens, seed).to(dev, dt)
    raw = read_dense_mlp(get, layer)  # the source's tensors, as the filler reads them

    def ref(t: torch.Tensor) -> torch.Tensor:  # a weight as the module holds it (its dtype), for an fp32 reference
        return t.to(wdt).to(dev).float()

    x = local_rows(x_full, config)
    seen: list = []  # the experts' own inputs and outputs inside the layer's forward

    def keep(module, args, output):
        seen.append((*args[:3], output[0] if isinstance(output, tuple) else output))

    was, hook = moe.training, moe.experts.register_forward_hook(keep)
    moe.eval()
    try:
        out = moe(x)
    finally:
        hook.remove()
        moe.train(was)
    out = out[0] if isinstance(out, tuple) else out
    rec = {"layer": layer, "rank": _rank(), "tokens": tokens, "local_tokens": x.shape[0] * x.shape[1],
           "dtype": str(dt).removeprefix("torch."), "weights_dtype": str(wdt).removeprefix("torch.")}
    rec["max_abs_diff"], rec["max_abs_dense"] = _compare(out, dense_mlp(x.float(), *(ref(t) for t in raw)))

    xr = x.reshape(-1, x.shape[-1]).float()
    rec["router_max_abs_diff"], rec["router_max_abs"] = _compare(
        F.linear(xr, moe.router.weight.float()), F.linear(xr, ref(plan.router(config.hidden_size, opts, layer))))

    local = list(moe.local_expert_indices)
    per_expert = _split_expert_io(*seen[0], len(local)) if seen else [None] * len(local)
    idle = [j for j, io in enumerate(per_expert) if io is None or io[0].shape[0] == 0]
    if idle:  # no token was routed to these experts: run them on the first EXPERT_TOKENS check tokens
        rows = x_full.reshape(-1, x_full.shape[-1])[:EXPERT_TOKENS]
        n = rows.shape[0]
        counts = torch.tensor([n if j in idle else 0 for j in range(len(local))])
        probs = torch.ones(n * len(idle), dtype=torch.float32, device=dev)
        inputs = rows.repeat(len(idle), 1)
        got, _ = moe.experts(inputs, counts, probs)
        for j, r, p_, o in zip(idle, inputs.split(n), probs.split(n), got.split(n)):
            per_expert[j] = (r, p_, o)
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    scales, inputs = [], []  # per expert: what multiplies its reference output, its input rows
    for rows, probs, _ in per_expert:
        scale = probs.float().unsqueeze(-1)
        if config.moe_apply_probs_on_input:  # Megatron scales the expert's input, not its output, by the probability
            rows, scale = rows.float() * scale, torch.ones_like(scale)
        scales.append(scale)
        inputs.append(rows.float())

    def shard_ref(w) -> list[torch.Tensor]:  # this rank's expert-tensor shard of an expert, as the module holds it
        return [ref(shard(t.to(dt), etp_rank, etp, dim)) for t, dim in ((w.gate, 0), (w.up, 0), (w.down, 1))]

    if expert_gets:  # several dense sources: each expert against its source's MLP
        from nemo_upcycle.core.sources import source_of

        wants = [None] * len(local)
        for i, g in enumerate(expert_gets):
            js = [j for j, e in enumerate(local) if source_of(opts, e, len(expert_gets)) == i]
            if js:
                got_i = expert_references(read_dense_mlp(g, layer), opts, layer, [local[j] for j in js],
                                          [inputs[j] for j in js], shard_ref, plan)
                for j, w in zip(js, got_i):
                    wants[j] = w
    else:
        wants = expert_references(raw, opts, layer, local, inputs, shard_ref, plan)
    experts = {}
    for j, (e, want, scale) in enumerate(zip(local, wants, scales)):
        got = per_expert[j][2]
        experts[e] = (*_compare(got, scale * want), got.shape[0], j in idle)  # diff, max |ref|, rows, idle
    rec["experts"] = experts
    rec["seconds"] = time.perf_counter() - t0
    return rec


def expert_references(raw, opts: UpcycleOptions, layer: int, experts: list[int], inputs: list, weights,
                      plan: Optional[UpcyclePlan] = None) -> list:
    """``dense_mlp`` of each expert (``core.upcycle.expert_weights``, then ``weights(w)``: this rank's shard, as the
    module holds it) on its input rows. Experts whose weights are views of the dense tensors (plain copies, unscaled
    granular shards) share one GEMM per distinct view; built ones (scaled, noise, Drop-Upcycling) go one at a time."""
    out: list = [None] * len(experts)
    shared: dict = {}
    for j, e in enumerate(experts):
        units = plan.units(opts, layer, e, raw[0].shape[0]) if plan is not None else None
        w = expert_weights(*raw, opts, layer, e, units=units)
        if all(t.untyped_storage().data_ptr() == r.untyped_storage().data_ptr() for t, r in zip(w, raw)):
            key = tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in w)
            shared.setdefault(key, (w, []))[1].append(j)
        else:
            out[j] = dense_mlp(inputs[j], *weights(w))
    for w, js in shared.values():
        ys = dense_mlp(torch.cat([inputs[j] for j in js]), *weights(w)).split([inputs[j].shape[0] for j in js])
        for j, y in zip(js, ys):
            out[j] = y
    return out


def _split_expert_io(hidden, tokens_per_expert, probs, output, n: int) -> list:
    """(input rows, probabilities, output rows) per local expert from one ``experts.forward`` call."""
    counts = [int(c) for c in (tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else tokens_per_expert)]
    if len(counts) != n or sum(counts) != hidden.shape[0]:
        return [None] * n
    return list(zip(hidden.split(counts), probs.reshape(-1).split(counts), output[: hidden.shape[0]].split(counts)))


def _rank() -> int:
    from nemo_upcycle.system.launcher import rank

    return rank()


def run_checks(roots, opts: UpcycleOptions, source: str, weights_dtype: Optional[torch.dtype] = None,
               plan: Optional[UpcyclePlan] = None) -> list[dict]:
    """This rank's records for every MoE layer it holds, in global layer order (a collective: call on every rank)."""
    from nemo_upcycle.formats.sources import open_expert_sources

    src = open_dense(source)
    gets = [s.get for s in open_expert_sources(src, opts.expert_sources)] or None
    return [check_layer(moe, opts, src.get, seed=opts.seed, weights_dtype=weights_dtype, plan=plan, expert_gets=gets)
            for moe in moe_layers(roots)]


@contextlib.contextmanager
def in_fp32(roots: Iterable[torch.nn.Module]):
    """bf16 / fp16 parameters and buffers under ``roots`` temporarily replaced, in their modules, by fp32 copies;
    yields their dtype (None when all are fp32 already). The modules get their own tensors back after. Mixed-precision
    runs check the freshly upcycled weights this way: exactly what trains, without the rounding of bf16 activations
    (the fp32 ``STEP0_MLP_RTOL`` applies). The parameters themselves are never touched: changing a parameter's dtype
    (``p.data = p.data.float()``) drops its gradient accumulator and with it the hooks DDP registered there
    (torch's ``VariableHooks::set_data``), after which its gradients would never reach ``main_grad``."""
    copies, swapped, low = {}, [], None
    for root in roots:
        for m in torch.nn.Module.modules(root):  # unbound: NeMo's MegatronParallel shadows some Module methods
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is None or t.dtype not in (torch.bfloat16, torch.float16):
                        continue
                    low = t.dtype
                    if id(t) not in copies:
                        f = t.detach().float()
                        copies[id(t)] = torch.nn.Parameter(f, requires_grad=False) if store is m._parameters else f
                    swapped.append((store, k, t))
                    store[k] = copies[id(t)]
    try:
        yield low
    finally:
        for store, k, t in reversed(swapped):
            store[k] = t


def gather(records: list[dict]) -> Optional[list[dict]]:
    """Every rank's records on rank 0 (None elsewhere); the records themselves without a process group."""
    import torch.distributed as dist

    from nemo_upcycle.system.launcher import is_rank0

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    out = [None] * dist.get_world_size() if is_rank0() else None
    dist.gather_object(records, out, dst=0)
    return [r for part in out for r in part] if out is not None else None


def construction_note(opts: UpcycleOptions) -> tuple[bool, str]:
    """``core.options.step0_report``, plus what routing adds: a capacity factor drops tokens past an expert's
    capacity (their MoE output is zero), which no upcycling undoes."""
    exact, reason = step0_report(opts)
    if exact and opts.moe_expert_capacity_factor is not None:
        return False, (f"capacity factor {opts.moe_expert_capacity_factor:g}: tokens past an expert's capacity are "
                       "dropped (their MoE output is zero); " + reason)
    return exact, reason


def summarize(records: list[dict], opts: UpcycleOptions) -> dict:
    """The ``layers`` block of ``step0.json`` from all ranks' records."""
    dtype = records[0]["dtype"] if records else "float32"
    rtol = rtol_for(getattr(torch, dtype))
    exact, reason = construction_note(opts)
    rows, mismatches = {}, []

    def bad(diff: float, ref: float) -> bool:
        return not diff <= rtol * ref  # NaN fails

    for r in sorted(records, key=lambda r: (r["layer"], r["rank"])):
        row = rows.setdefault(r["layer"], {"layer": r["layer"], "ranks": [], "tokens": 0, "max_abs_diff": 0.0,
                                           "max_abs_dense": 0.0, "router_max_abs_diff": 0.0, "router_max_abs": 0.0,
                                           "experts": set(), "idle_experts": set(), "expert_max_abs_diff": 0.0,
                                           "worst_expert": None,
                                           "output_ok": True, "router_ok": True, "experts_ok": True})
        row["ranks"].append(r["rank"])
        row["tokens"] = r["tokens"]  # the layer's check tokens, over the ranks that split them
        for k in ("max_abs_diff", "max_abs_dense", "router_max_abs_diff", "router_max_abs"):
            row[k] = max(row[k], r[k]) if r[k] == r[k] else r[k]  # a NaN sticks
        if bad(r["max_abs_diff"], r["max_abs_dense"]):
            row["output_ok"] = False
            mismatches.append({"what": "output", "layer": r["layer"], "expert": None, "rank": r["rank"],
                               "max_abs_diff": r["max_abs_diff"], "tol": rtol * r["max_abs_dense"]})
        if bad(r["router_max_abs_diff"], r["router_max_abs"]):
            row["router_ok"] = False
            mismatches.append({"what": "router", "layer": r["layer"], "expert": None, "rank": r["rank"],
                               "max_abs_diff": r["router_max_abs_diff"], "tol": rtol * r["router_max_abs"]})
        for e, (diff, ref, *more) in sorted(r["experts"].items()):
            row["experts"].add(int(e))
            if more[1:2] == [True]:
                row["idle_experts"].add(int(e))
            if not diff <= row["expert_max_abs_diff"]:
                row["expert_max_abs_diff"], row["worst_expert"] = diff, int(e)
            if bad(diff, ref):
                row["experts_ok"] = False
                mismatches.append({"what": "expert", "layer": r["layer"], "expert": int(e), "rank": r["rank"],
                                   "max_abs_diff": diff, "tol": rtol * ref})
    table = []
    for row in rows.values():
        row["experts"], row["idle_experts"] = len(row["experts"]), sorted(row["idle_experts"])
        row["tol"] = rtol * row["max_abs_dense"]
        row["passed"] = row["output_ok"] and row["router_ok"] and row["experts_ok"]
        table.append(row)
    weights = records[0].get("weights_dtype", dtype) if records else dtype
    return {"rtol": rtol, "dtype": dtype, "weights_dtype": weights, "tokens_per_layer": table[0]["tokens"]
            if table else 0, "expert_tokens": EXPERT_TOKENS, "equivalent_by_construction": exact, "reason": reason,
            "ranks": len({r["rank"] for r in records}), "passed": all(r["passed"] for r in table) and bool(table),
            "seconds": round(max((_rank_seconds(records)).values(), default=0.0), 3),
            "rows": table, "mismatches": mismatches}


def _rank_seconds(records: list[dict]) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in records:
        out[r["rank"]] = out.get(r["rank"], 0.0) + r["seconds"]
    return out


def format_summary(s: dict) -> str:
    """One line for the log: PASS/FAIL, the worst layer, the first mismatch named."""
    if not s["rows"]:
        return "step-0 layer check: no MoE layer"
    worst = max(s["rows"], key=lambda r: r["max_abs_diff"] / (r["max_abs_dense"] or 1.0))
    ranks = f"{s['ranks']} rank" + ("s" if s["ranks"] != 1 else "")
    line = (f"step-0 layer check ({len(s['rows'])} MoE layers on {ranks}, {s['seconds']:.2f} s): worst "
            f"layer {worst['layer']} max |dMLP| {worst['max_abs_diff']:.2e} (max |MLP| {worst['max_abs_dense']:.2e}, "
            f"rtol {s['rtol']:g}): {'PASS' if s['passed'] else 'FAIL'}")
    if s["mismatches"]:
        m = next((m for m in s["mismatches"] if m["what"] == "expert"), s["mismatches"][0])
        where = f"layer {m['layer']}" + (f" expert {m['expert']}" if m["expert"] is not None else "")
        line += f"; {m['what']} differs at {where} on rank {m['rank']} ({m['max_abs_diff']:.2e} > {m['tol']:.2e})"
    if not s["equivalent_by_construction"]:
        line += f"; not function-preserving by construction: {s['reason']}"
    return line
