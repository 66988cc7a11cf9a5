"""The core on its own: routing against Megatron-core's and transformers' routing, the reference MoE
against transformers' MixtralSparseMoeBlock, router inits, layer selection, Drop-Upcycling, and the
per-expert determinism that lets each expert-parallel rank build only its own experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemo_upcycle.core import LayerExperts, UpcycleOptions, expert_weights, resolve_moe_layers, route, router_weight
from nemo_upcycle.errors import UpcycleError

G0 = torch.Generator().manual_seed(0)
LOGITS = torch.randn(57, 8, generator=G0)


def dense_probs(probs_TK, idx_TK, E):
    return torch.zeros(probs_TK.shape[0], E).scatter(1, idx_TK, probs_TK)


def swiglu_expert(x_TD: torch.Tensor, gate_FD: torch.Tensor, up_FD: torch.Tensor,
                  down_DF: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x): the Llama / Mixtral expert."""
    return F.linear(F.silu(F.linear(x_TD, gate_FD)) * F.linear(x_TD, up_FD), down_DF)


def moe_mlp(x_TD: torch.Tensor, router_ED: torch.Tensor, experts, topk: int, **routing) -> torch.Tensor:
    """Reference sparse MoE (every token through its k experts, no capacity): out_t = sum_k probs[t,k] *
    expert_{indices[t,k]}(x_t). ``experts``: (gate, up, down) list."""
    probs, indices = route(F.linear(x_TD, router_ED), topk, **routing)
    out = torch.zeros_like(x_TD)
    for e, (g, u, d) in enumerate(experts):
        tok, slot = torch.nonzero(indices == e, as_tuple=True)
        if tok.numel():
            y = swiglu_expert(x_TD[tok], g, u, d) * probs[tok, slot, None].to(x_TD.dtype)
            out.index_add_(0, tok, y)
    return out


@pytest.mark.parametrize("pre,score,k", [(False, "softmax", 2), (True, "softmax", 2), (False, "sigmoid", 2),
                                         (False, "sigmoid", 1), (False, "softmax", 1)])
def test_route_matches_megatron(pre, score, k):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    ref_probs, ref_map = topk_routing_with_score_function(LOGITS, k, use_pre_softmax=pre, score_function=score)
    probs, idx = route(LOGITS, k, score, pre)
    ours = dense_probs(probs, idx, 8)
    assert torch.equal(ours != 0, ref_map)
    torch.testing.assert_close(ours, ref_probs, rtol=1e-6, atol=1e-7)


def test_route_negative_control():
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    ref, _ = topk_routing_with_score_function(LOGITS, 2, use_pre_softmax=True)
    probs, idx = route(LOGITS, 2, pre_softmax=True, renormalize=True)  # renormalized != Megatron's pre-softmax
    assert (dense_probs(probs, idx, 8) - ref).abs().max() > 0.05


def test_moe_mlp_matches_transformers_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=20, intermediate_size=13, num_local_experts=6,
                                                num_experts_per_tok=2)).eval()
    x = torch.randn(1, 31, 20)
    experts = [(e.w1.weight, e.w3.weight, e.w2.weight) for e in block.experts]
    with torch.no_grad():
        ref, _ = block(x)
        ours = moe_mlp(x[0], block.gate.weight, experts, 2)
        torch.testing.assert_close(ours, ref[0], rtol=1e-5, atol=1e-6)
        experts[3] = (experts[3][1], experts[3][0], experts[3][2])  # negative control: swap gate/up of one expert
        assert (moe_mlp(x[0], block.gate.weight, experts, 2) - ref[0]).abs().max() > 1e-3


def test_router_inits():
    opts = UpcycleOptions(8, 2, granularity=4)
    r = router_weight(16, opts, layer=3)
    assert r.shape == (8, 16)
    assert torch.equal(r[0], r[3]) and torch.equal(r[4], r[7]) and not torch.equal(r[3], r[4])
    assert torch.equal(r, router_weight(16, opts, layer=3)) and not torch.equal(r, router_weight(16, opts, layer=4))
    normal = router_weight(4096, UpcycleOptions(8, 2, router_std=0.02), layer=0)
    assert abs(normal.std().item() - 0.02) < 1e-3 and len(set(map(tuple, normal.tolist()))) == 8
    assert not router_weight(16, UpcycleOptions(8, 2, router_init="zeros"), 0).any()
    base = torch.arange(8 * 4, dtype=torch.float32).view(8, 4)
    vg = router_weight(4, UpcycleOptions(8, 2, granularity=2), 0, base=base)
    assert torch.equal(vg, base[:4].repeat_interleave(2, dim=0))


@pytest.mark.parametrize("opts", [UpcycleOptions(8, 2), UpcycleOptions(8, 2, granularity=2, noise_std=0.01),
                                  UpcycleOptions(8, 2, drop_ratio=0.3)])
def test_a_rank_builds_only_its_experts_identically(opts):
    g = torch.Generator().manual_seed(1)
    gate, up, down = (torch.randn(24, 10, generator=g), torch.randn(24, 10, generator=g),
                      torch.randn(10, 24, generator=g))
    full = {e: expert_weights(gate, up, down, opts, 2, e) for e in range(opts.num_moe_experts)}
    rank1 = LayerExperts(lambda layer: (gate, up, down), opts)  # EP=2, rank 1 asks only for experts 4..7
    for e in range(4, 8):
        assert all(torch.equal(a, b) for a, b in zip(rank1.get(2, e), full[e]))


def test_granular_shards_sum_to_dense():
    """sum_j shard_j(x) == dense(x) for SwiGLU: the identity behind exact granular upcycling."""
    g = torch.Generator().manual_seed(2)
    gate, up, down = (torch.randn(24, 10, generator=g), torch.randn(24, 10, generator=g),
                      torch.randn(10, 24, generator=g))
    x = torch.randn(5, 10, generator=g)
    opts = UpcycleOptions(8, 4, granularity=4, scaling="none")
    parts = sum(swiglu_expert(x, *expert_weights(gate, up, down, opts, 0, e)) for e in range(4))
    torch.testing.assert_close(parts, swiglu_expert(x, gate, up, down), rtol=1e-5, atol=1e-5)
    other_copy = sum(swiglu_expert(x, *expert_weights(gate, up, down, opts, 0, e)) for e in range(4, 8))
    torch.testing.assert_close(other_copy, parts)


def test_drop_upcycling_statistics():
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(400, 64, generator=g) * 0.5 + 0.1
    up, down = gate.clone(), gate.T.clone()
    opts = UpcycleOptions(4, 2, drop_ratio=0.25, seed=5)
    w = expert_weights(gate, up, down, opts, layer=0, expert=1)
    changed = ~(w.gate == gate).all(dim=1)
    assert changed.sum().item() == 100
    assert torch.equal(changed, ~(w.down == down).all(dim=0))  # same units in gate rows and down columns
    fresh = w.gate[changed]
    assert abs(fresh.mean().item() - gate.mean().item()) < 0.02 and abs(fresh.std().item() - gate.std().item()) < 0.02
    w0 = expert_weights(gate, up, down, opts, layer=0, expert=0)
    assert not torch.equal(~(w0.gate == gate).all(dim=1), changed)


def test_moe_layers():
    assert resolve_moe_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_moe_layers("every:2", 5) == [0, 2, 4]  # Megatron moe_layer_freq=2: i % 2 == 0
    assert resolve_moe_layers("3,1", 5) == [1, 3] and resolve_moe_layers([0, 4], 5) == [0, 4]
    for bad in ("every:0", "x,y", "9", []):
        with pytest.raises(UpcycleError):
            resolve_moe_layers(bad, 5)


def test_scale_factors_match_the_paper():
    assert UpcycleOptions(8, 2, granularity=2).scale_factor() == 2  # s = G
    pre = UpcycleOptions(8, 2, granularity=2, moe_router_pre_softmax=True, scaling="megatron")
    assert pre.scale_factor() == 8  # R*G*G/k
    assert UpcycleOptions(8, 2).scale_factor() == 1
    assert UpcycleOptions(8, 2, scaling="none", granularity=2).scale_factor() == 1
