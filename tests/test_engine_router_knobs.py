"""Routing knobs online: Megatron MoEs built by NeMo with aux-loss-free expert bias (sigmoid), a top-k scaling factor
and group-limited routing, filled from the dense checkpoint, compute transformers' dense logits at step 0 (fp32,
within 1e-5); negative control: the scaling factor under megatron scaling (1/s not folded). The metrics' expert-bias
reading equals the routers' buffers.
"""

from __future__ import annotations

import pytest
import torch

from helpers import load_llama

pytestmark = pytest.mark.slow  # imports NeMo (~25 s)


def build(dense, **moe):
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides
    from nemo_upcycle.engine.model import upcycle_into
    from nemo_upcycle.formats.base import open_dense

    src = open_dense(dense)
    moe = {"num_moe_experts": 8, "moe_router_topk": 2, "moe_token_dispatcher_type": "allgather", **moe}
    cfg = UpcycledLlamaConfig.from_dense(src.config, params_dtype=torch.float32, **{**cpu_config_overrides(), **moe})
    module = cfg.configure_model(None).eval()
    upcycle_into(module, cfg, src, progress=False)
    return cfg, module


KNOBS = [dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
         dict(moe_router_topk_scaling_factor=2.5),
         dict(moe_router_num_groups=4, moe_router_group_topk=2, moe_router_dtype="fp64"),
         dict(num_moe_experts=16, moe_router_topk=4, upcycle_granularity=2, moe_router_num_groups=4,
              moe_router_group_topk=2)]


@pytest.mark.parametrize("moe", KNOBS, ids=["expert-bias", "tsf", "groups-fp64", "groups-G2"])
def test_step0_with_routing_knobs(megatron_world, tiny_llama, token_ids, moe):
    from nemo_upcycle.core import step0_report
    from nemo_upcycle.engine.model import megatron_forward_logits

    cfg, module = build(tiny_llama, **moe)
    assert step0_report(cfg.upcycle_options())[0]
    ref = load_llama(tiny_llama)(token_ids).logits
    assert (megatron_forward_logits(module, token_ids) - ref).abs().max().item() < 1e-5


def test_tsf_under_megatron_scaling_is_not_exact(megatron_world, tiny_llama, token_ids):
    from nemo_upcycle.core import step0_report
    from nemo_upcycle.engine.model import megatron_forward_logits

    cfg, module = build(tiny_llama, moe_router_topk_scaling_factor=2.5, upcycle_scaling="megatron")
    assert not step0_report(cfg.upcycle_options())[0]
    ref = load_llama(tiny_llama)(token_ids).logits
    assert (megatron_forward_logits(module, token_ids) - ref).abs().max().item() > 1e-3


def test_metrics_read_the_expert_bias(megatron_world, tiny_llama):
    from nemo_upcycle.engine.metrics import RouterStats

    cfg, module = build(tiny_llama, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    stats = RouterStats(cfg.num_layers, 8, 2)
    stats.attach([module])
    g = torch.Generator().manual_seed(0)
    want = []
    for layer in module.decoder.layers:
        b = layer.mlp.router.expert_bias
        b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))
        want.append((b.max() - b.min()).item())
    got = stats.expert_bias()
    assert got["expert_bias_spread_layers"] == pytest.approx(want)
    assert got["expert_bias_max_abs"] == pytest.approx(max(lyr.mlp.router.expert_bias.abs().max().item()
                                                           for lyr in module.decoder.layers))
    _, plain = build(tiny_llama)
    off = RouterStats(cfg.num_layers, 8, 2)
    off.attach([plain])
    assert off.expert_bias() == {}
