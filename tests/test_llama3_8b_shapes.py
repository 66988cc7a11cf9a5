"""Llama-3-8B -> 8x8B (E8 top-2) on the meta device: the exact key -> shape map and parameter counts.

The reference is transformers' own MixtralForCausalLM built from our config on the meta device (zero
memory), plus an independent closed-form count.
"""

from __future__ import annotations

import torch

from nemo_upcycle.core import UpcycleOptions
from nemo_upcycle.formats.mixtral import layout, mixtral_config, parameter_counts

LLAMA3_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
}
OPTS = UpcycleOptions(num_moe_experts=8, moe_router_topk=2)


def meta_mixtral(cfg: dict):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        return MixtralForCausalLM(config)


def test_key_shape_map_equals_transformers():
    cfg = mixtral_config(LLAMA3_8B, OPTS, torch.bfloat16)
    ours = {spec.name: spec.shape for spec, _ in layout(LLAMA3_8B, OPTS, torch.bfloat16)}
    theirs = {k: tuple(v.shape) for k, v in meta_mixtral(cfg).state_dict().items()}
    assert ours.keys() == theirs.keys(), (sorted(ours.keys() ^ theirs.keys())[:5])
    bad = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not bad, list(bad.items())[:5]
    # a few spot checks of the exact map
    assert ours["model.layers.31.block_sparse_moe.gate.weight"] == (8, 4096)
    assert ours["model.layers.0.block_sparse_moe.experts.7.w1.weight"] == (14336, 4096)
    assert ours["model.layers.0.block_sparse_moe.experts.7.w2.weight"] == (4096, 14336)
    assert ours["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert len(ours) == 2 + 1 + 32 * (6 + 1 + 8 * 3)


def test_parameter_counts():
    V, D, F, L, H, KV, hd, E, k = 128256, 4096, 14336, 32, 32, 8, 128, 8, 2
    attn = D * H * hd * 2 + D * KV * hd * 2
    mlp = 3 * D * F
    per_layer_shared = attn + 2 * D + E * D  # attention, two norms, router
    total = 2 * V * D + D + L * (per_layer_shared + E * mlp)
    active = 2 * V * D + D + L * (per_layer_shared + k * mlp)
    counts = parameter_counts(LLAMA3_8B, OPTS)
    assert counts == {"total": total, "active": active}
    model_total = sum(p.numel() for p in meta_mixtral(mixtral_config(LLAMA3_8B, OPTS, torch.bfloat16)).parameters())
    assert counts["total"] == model_total
    # the dense 8.0B plus 7 more copies of its 32 MLPs (3 x 4096 x 14336 each); active: one more copy
    assert round(total / 1e9, 1) == 47.5 and round(active / 1e9, 1) == 13.7


def test_granular_shapes():
    opts = UpcycleOptions(num_moe_experts=64, moe_router_topk=8, granularity=8)
    shapes = {s.name: s.shape for s, _ in layout(LLAMA3_8B, opts, torch.bfloat16)}
    assert shapes["model.layers.0.block_sparse_moe.experts.63.w1.weight"] == (14336 // 8, 4096)
    assert shapes["model.layers.0.block_sparse_moe.gate.weight"] == (64, 4096)
    dense_mlp = 3 * 4096 * 14336
    c = parameter_counts(LLAMA3_8B, opts)
    assert (c["total"] - parameter_counts(LLAMA3_8B, UpcycleOptions(8, 1, granularity=8))["total"]
            == 32 * 7 * dense_mlp + 32 * 56 * 4096)
