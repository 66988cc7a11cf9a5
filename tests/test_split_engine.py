"""Expert splits and data routers in the online engine (issue 15): the Megatron MoE NeMo builds, filled at train start
with an importance / clustering split and a kmeans router computed from calibration text, computes transformers'
dense logits; the per-layer step-0 check passes with the plan the filler used and fails without it (negative
control); under torchrun at EP2 and ETP2 every rank builds from rank 0's plan and the check passes on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import (
    add_tokenizer,
    calibration_file,
    llama_with_tokenizer,
    load_llama,
    perturbed_mlp_copy,
    shakespeare_text,
)

pytestmark = pytest.mark.slow  # imports NeMo


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return calibration_file(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def dense_tok(tmp_path_factory) -> Path:
    return llama_with_tokenizer(tmp_path_factory.mktemp("eng") / "dense", 300)


def build(dense, **moe):
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides
    from nemo_upcycle.formats.base import open_dense

    src = open_dense(dense)
    moe = {"moe_token_dispatcher_type": "allgather", **moe}
    cfg = UpcycledLlamaConfig.from_dense(src.config, params_dtype=torch.float32, **{**cpu_config_overrides(), **moe})
    return src, cfg, cfg.configure_model(None).eval()


@pytest.mark.parametrize("split,router", [("importance", "kmeans"), ("clustering", None)])
def test_online_split_step0(megatron_world, dense_tok, calib, split, router):
    from nemo_upcycle.core.plan import UpcyclePlan
    from nemo_upcycle.engine import step0
    from nemo_upcycle.engine.calibrate import cached_plan
    from nemo_upcycle.engine.model import megatron_forward_logits, upcycle_into

    src, cfg, module = build(dense_tok, num_moe_experts=8, moe_router_topk=4, upcycle_granularity=2,
                             upcycle_expert_split=split, upcycle_router_init=router,
                             upcycle_calibration=[str(calib)], upcycle_calibration_tokens=512)
    upcycle_into(module, cfg, src, progress=False)
    plan = cached_plan(cfg, src)
    assert plan is not None and sorted(plan.perms) == [0, 1, 2] and plan.record["tokens"] == 512
    assert (router == "kmeans") == bool(plan.routers)
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(5))
    ref = load_llama(dense_tok)(ids).logits
    assert (megatron_forward_logits(module, ids) - ref).abs().max().item() < 1e-5
    if router:
        got = module.decoder.layers[1].mlp.router.weight
        assert torch.equal(got, plan.routers[1].to(got.dtype))
    opts = cfg.upcycle_options()
    good = step0.summarize(step0.run_checks([module], opts, str(dense_tok), plan=plan), opts)
    assert good["passed"], good["mismatches"]
    # negative control: a plan with other splits (seeded random) is not what the filler built
    other = UpcyclePlan(perms={i: torch.stack([torch.randperm(44) for _ in range(4)]) for i in range(3)},
                        routers=plan.routers)
    bad = step0.summarize(step0.run_checks([module], opts, str(dense_tok), plan=other), opts)
    assert not bad["passed"] and any(m["what"] == "expert" for m in bad["mismatches"])


def test_layouts_build_from_rank0s_plan(tmp_path_factory, calib):
    """torchrun x2: EP2 with importance + kmeans, ETP2 with a clustering split (the tiny recipe, online)."""
    from test_step0_layouts import VOCAB, torchrun

    tok = add_tokenizer(tmp_path_factory.mktemp("tok"), 99, shakespeare_text(50_000))
    common = [VOCAB, "logging.report=false", "upcycle=granular_g2", f"upcycle.calibration={calib}",
              f"data.tokenizer={tok}", "upcycle.calibration_tokens=512"]
    plan = [{"name": "ep2_importance_kmeans", "overrides": [*common, "parallel.expert_model_parallel_size=2",
                                                           "upcycle.expert_split=importance",
                                                           "upcycle.router_init=kmeans"]},
            {"name": "etp2_clustering", "overrides": [*common, "parallel.expert_tensor_parallel_size=2",
                                                      "upcycle.expert_split=clustering"]}]
    work = torchrun(2, plan, tmp_path_factory.mktemp("split_x2"))
    for name in ("ep2_importance_kmeans", "etp2_clustering"):
        s = json.loads((work / name / "step0.json").read_text())
        layers = s["layers"]
        assert layers["passed"] and layers["ranks"] == 2 and layers["equivalent_by_construction"], (name, layers)
        assert all(r["experts"] == 4 for r in layers["rows"])
        cal = layers["calibration"]
        assert cal["tokens"] == 512 and cal["seconds"] > 0
        ident = json.loads((work / name / "run_identity.json").read_text())
        assert ident["upcycle.expert_split"] in ("importance", "clustering")
        assert ident["upcycle.calibration"] == str(calib)
    log = (work / "log.txt").read_text()
    assert log.count("calibration: 512 tokens") == 2  # rank 0 only, once per run


def test_online_expert_sources(megatron_world, dense_tok, tmp_path):
    """Online with two dense sources (MLP-perturbed copies of the base, its tokenizer): every Megatron expert holds its
    source's MLP (copy i from source i mod 2); the step-0 check passes every expert against its own source and says
    the MoE is not function-preserving; checked against the base alone, the experts of source 1 mismatch."""
    import shutil

    from nemo_upcycle.engine import step0
    from nemo_upcycle.engine.model import upcycle_into

    sources = []
    for seed in (1, 2):
        perturbed_mlp_copy(dense_tok, tmp_path / f"s{seed}", seed)
        for f in dense_tok.glob("tokenizer*"):
            shutil.copy2(f, tmp_path / f"s{seed}" / f.name)
        sources.append(str(tmp_path / f"s{seed}"))
    src, cfg, module = build(dense_tok, num_moe_experts=4, moe_router_topk=2, upcycle_expert_sources=sources)
    upcycle_into(module, cfg, src, progress=False)
    experts = module.decoder.layers[1].mlp.experts.local_experts
    for e in range(4):
        want = load_llama(sources[e % 2]).model.layers[1].mlp.down_proj.weight
        assert torch.equal(experts[e].linear_fc2.weight, want)
    opts = cfg.upcycle_options()
    s = step0.summarize(step0.run_checks([module], opts, str(dense_tok)), opts)
    assert not s["equivalent_by_construction"] and "2 dense sources" in s["reason"]
    assert all(r["experts_ok"] and r["router_ok"] for r in s["rows"])
    import dataclasses

    base_only = dataclasses.replace(opts, expert_sources=())  # negative control: every expert against the base
    bad = step0.summarize(step0.run_checks([module], base_only, str(dense_tok)), base_only)
    assert {m["expert"] for m in bad["mismatches"] if m["what"] == "expert"} == {0, 1, 2, 3}
