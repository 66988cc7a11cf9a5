"""The routing knobs people expect from Megatron-core, under its names, and what each does to step 0.

- ``moe_router_enable_expert_bias``: aux-loss-free balancing (Wang et al., arXiv 2408.15664; DeepSeek-V3): a per-expert
  bias added to the scores for the top-k choice only, updated from the token counts. Megatron allows it with the
  sigmoid score function only (``transformer_config.py``). It starts at zero: step 0 is unchanged.
- ``moe_router_topk_scaling_factor`` s: the kept probabilities times s (``moe_utils.topk_routing_with_score_function``).
  ``exact`` scaling folds 1/s into the down projection (``UpcycleOptions.scale_factor``), so step 0 stays exact;
  the other scalings leave the output scaled by s.
- ``moe_router_num_groups`` / ``moe_router_group_topk``: group-limited routing (DeepSeek-V2 device-limited routing):
  experts in equal groups, a token picks ``group_topk`` groups by the sum of their top-(k / group_topk) scores, then
  its k experts inside them (top-k over the chosen groups). With whole-copy experts (G = 1) any choice is the dense
  MLP; at G > 1 a group must hold whole copies, or a copy split between a chosen and a dropped group is seen in part.
- ``moe_router_dtype`` (fp32 / fp64): the routing's precision; no effect on the math.
"""

from __future__ import annotations

from typing import Optional

from nemo_upcycle.errors import FieldError

ROUTER_DTYPES = ("fp32", "fp64")


def validate_router_knobs(opts) -> None:
    """Refuse knob combinations Megatron refuses deep in model construction, by field name."""
    bias, score = opts.moe_router_enable_expert_bias, opts.moe_router_score_function
    if bias and score != "sigmoid":
        raise FieldError("{moe_router_enable_expert_bias} (aux-loss-free balancing) needs the sigmoid score function "
                         "in Megatron-core, not {moe_router_score_function=}: set it to sigmoid.",
                         moe_router_enable_expert_bias=bias, moe_router_score_function=score)
    s = opts.moe_router_topk_scaling_factor
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0):
        raise FieldError("{moe_router_topk_scaling_factor=} must be a number > 0 (omit it for no scaling).",
                         moe_router_topk_scaling_factor=s)
    groups, gk = opts.moe_router_num_groups, opts.moe_router_group_topk
    if (groups is None) != (gk is None):
        raise FieldError("group-limited routing needs both {moe_router_num_groups=} and {moe_router_group_topk=}.",
                         moe_router_num_groups=groups, moe_router_group_topk=gk)
    if groups is not None:
        E, k = opts.num_moe_experts, opts.moe_router_topk
        if groups < 1 or E % groups:
            raise FieldError("{moe_router_num_groups=} must divide {num_moe_experts=} into equal groups.",
                             moe_router_num_groups=groups, num_moe_experts=E)
        if not 1 <= gk <= groups or k % gk:
            raise FieldError("{moe_router_group_topk=} must lie in 1..{moe_router_num_groups=} and divide "
                             "{moe_router_topk=} (each chosen group gives k / group_topk experts).",
                             moe_router_group_topk=gk, moe_router_num_groups=groups, moe_router_topk=k)
    dtype = opts.moe_router_dtype
    if dtype is not None and dtype not in ROUTER_DTYPES:
        raise FieldError(f"{{moe_router_dtype=}} is not one of {', '.join(ROUTER_DTYPES)} (omit it for the model's).",
                         moe_router_dtype=dtype)


def topk_scale(opts) -> float:
    """What the kept probabilities are multiplied by (1 without the knob)."""
    s = opts.moe_router_topk_scaling_factor
    return float(s) if s else 1.0


def knobs_step0(opts) -> Optional[str]:
    """Why these knobs break step-0 equivalence (None: they do not)."""
    s = topk_scale(opts)
    if s != 1.0 and opts.scaling != "exact":
        return (f"moe_router_topk_scaling_factor {s:g} scales the routed output and {opts.scaling} scaling does not "
                "fold 1/s into the experts (use scaling exact).")
    G, groups = opts.granularity, opts.moe_router_num_groups
    if G > 1 and groups and (opts.num_moe_experts // groups) % G:
        per_group = opts.num_moe_experts // groups
        return (f"group-limited routing ({groups} groups of {per_group} experts) can split the G={G} shards of a copy "
                f"between a chosen and a dropped group; choose groups of whole copies ({{num_moe_experts}} / groups a "
                f"multiple of {G}).".replace("{num_moe_experts}", "num_moe_experts"))
    return None


def knobs_note(opts) -> str:
    """What the knobs add to an exact step-0 note (empty without knobs)."""
    parts = []
    if opts.moe_router_enable_expert_bias:
        parts.append("the aux-loss-free expert bias starts at zero")
    if topk_scale(opts) != 1.0:
        parts.append(f"1/{topk_scale(opts):g} (moe_router_topk_scaling_factor) is folded into the down projections")
    if opts.moe_router_num_groups:
        parts.append("group-limited routing picks whole copies")
    return (" " + "; ".join(parts) + ".") if parts else ""
