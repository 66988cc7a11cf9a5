"""Routing knobs (Megatron's names): aux-loss-free expert bias (sigmoid only), top-k scaling factor, group-limited
routing, router dtype. The step-0 claim of ``core.router_knobs`` is checked with Megatron-core's own routing function
(``topk_routing_with_score_function``) on experts the core builds, against the dense SwiGLU MLP; negative controls
where the claim is "not exact". The recipe keys are refused up front by name, each with its accepted neighbour.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import refused_then_neighbour
from nemo_upcycle.core import UpcycleOptions, expert_weights, router_weight, step0_report
from nemo_upcycle.errors import FieldError

TINY = "tiny_llama_upcycle"


def _mlp(gate, up, down, x):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def megatron_moe_vs_dense(opts: UpcycleOptions, bias: bool = False) -> float:
    """max |MoE(x) - dense(x)| with Megatron's routing (its knobs passed as Megatron takes them)."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    g = torch.Generator().manual_seed(3)
    D, Fd = 12, 24
    gate_FD, up_FD, down_DF = (torch.randn(s, generator=g) for s in ((Fd, D), (Fd, D), (D, Fd)))
    x = torch.randn(33, D, generator=g)
    logits = x @ router_weight(D, opts, 0).T
    expert_bias = torch.zeros(opts.num_moe_experts) if bias else None  # Megatron's buffer starts at zero
    probs, routing_map = topk_routing_with_score_function(
        logits, opts.moe_router_topk, use_pre_softmax=opts.moe_router_pre_softmax,
        num_groups=opts.moe_router_num_groups, group_topk=opts.moe_router_group_topk,
        scaling_factor=opts.moe_router_topk_scaling_factor, score_function=opts.moe_router_score_function,
        expert_bias=expert_bias)
    out = torch.zeros_like(x)
    for e in range(opts.num_moe_experts):
        w = probs[:, e:e + 1] * routing_map[:, e:e + 1]
        out += _mlp(*expert_weights(gate_FD, up_FD, down_DF, opts, 0, e), x) * w
    return (out - _mlp(gate_FD, up_FD, down_DF, x)).abs().max().item()


@pytest.mark.parametrize("kw", [
    dict(moe_router_topk_scaling_factor=2.5),
    dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    dict(moe_router_num_groups=4, moe_router_group_topk=2),
    dict(granularity=2, num_moe_experts=16, moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2),
    dict(granularity=2, num_moe_experts=16, moe_router_topk=4, moe_router_topk_scaling_factor=1.7,
         moe_router_dtype="fp32"),
], ids=["tsf", "expert-bias", "groups", "groups-G2", "tsf-G2"])
def test_knobs_keep_step0_exact(kw):
    opts = UpcycleOptions(**{"num_moe_experts": 8, "moe_router_topk": 2, **kw}).validate(ffn_hidden_size=24)
    exact, why = step0_report(opts)
    assert exact, why
    assert megatron_moe_vs_dense(opts, bias=opts.moe_router_enable_expert_bias) < 1e-4


@pytest.mark.parametrize("kw,words", [
    (dict(moe_router_topk_scaling_factor=2.5, scaling="megatron"), "does not fold 1/s"),
    (dict(granularity=2, num_moe_experts=12, moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2),
     "can split the G=2 shards"),
])
def test_knobs_not_exact_say_why_and_are_not(kw, words):
    opts = UpcycleOptions(**{"num_moe_experts": 8, "moe_router_topk": 2, **kw}).validate(ffn_hidden_size=24)
    exact, why = step0_report(opts)
    assert not exact and words in why, why
    assert megatron_moe_vs_dense(opts) > 1e-3


@pytest.mark.parametrize("kw,match", [
    (dict(moe_router_enable_expert_bias=True), "needs the sigmoid score function"),
    (dict(moe_router_num_groups=2), "needs both"),
    (dict(moe_router_num_groups=3, moe_router_group_topk=1), "must divide num_moe_experts=8"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=3), "must lie in 1..moe_router_num_groups=4"),
    (dict(moe_router_dtype="bf16"), "is not one of fp32, fp64"),
    (dict(moe_router_topk_scaling_factor=-1.0), "must be a number > 0"),
])
def test_knob_refusals(kw, match):
    with pytest.raises(FieldError, match=match):
        UpcycleOptions(8, 2, **kw).validate()


BAD = {  # recipe override -> (words, the accepted neighbour: a full override list)
    "moe.moe_router_enable_expert_bias=true": (
        "moe.moe_router_enable_expert_bias (aux-loss-free balancing) needs the sigmoid score function",
        ["moe.moe_router_enable_expert_bias=true", "moe.moe_router_score_function=sigmoid", "logging.export_hf=false"]),
    "moe.moe_router_group_topk=2": (
        "needs both moe.moe_router_num_groups=None and moe.moe_router_group_topk=2",
        ["moe.moe_router_group_topk=2", "moe.moe_router_num_groups=2",
         "logging.export_hf=false"]),
    "moe.moe_router_dtype=fp16": ("moe.moe_router_dtype='fp16' is not one of fp32, fp64",
                                  ["moe.moe_router_dtype=fp64"]),
    "moe.moe_router_topk_scaling_factor=2.0": (
        "logging.export_hf=true exports to HF, whose MoE formats cannot express",
        ["moe.moe_router_topk_scaling_factor=2.0", "logging.export_hf=false"]),
    "moe.moe_router_load_balancing_type=seq_aux": (
        "is not one of", ["moe.moe_router_load_balancing_type=global_aux_loss"]),
}


@pytest.mark.parametrize("override", list(BAD))
def test_recipe_refusals_and_neighbours(override):
    words, fix = BAD[override]
    refused_then_neighbour(TINY, [override], words, fix)  # the neighbour validates


def test_report_router_section_shows_knobs_and_expert_bias(tmp_path):
    """The report's router section names the routing knobs of the run record and plots / tabulates the expert bias
    over time; without the bias (negative control) neither appears."""
    import json

    from nemo_upcycle.apps.report import write_report

    def records(bias: bool) -> list[dict]:
        run = {"kind": "run", "step": 0, "tokens_per_step": 128, "num_experts": 4, "topk": 2,
               "router": {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": bias}}
        out = [run]
        for s in range(1, 6):
            rec = {"kind": "train", "step": s, "tokens": 128 * s, "loss": 5.0 - 0.1 * s, "router_entropy": 1.2,
                   "aux_loss": 1.0}
            if bias:
                rec.update(expert_bias_spread=1e-3 * s, expert_bias_max_abs=6e-4 * s)
            out.append(rec)
        return out

    for bias in (True, False):
        d = tmp_path / str(bias)
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(bias)))
        md = write_report(d, metrics_path=d / "metrics.jsonl").read_text()
        router = md.split("## Router", 1)[1].split("\n## ", 1)[0]
        assert ("`moe_router_enable_expert_bias=True`" in router) == bias, router
        assert "`moe_router_score_function=sigmoid`" in router
        assert ("| expert bias spread (layer mean) | 0.001 | 0.005 |" in router) == bias, router
        assert (d / "router.png").is_file()
