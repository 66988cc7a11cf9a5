"""Dense HF Llama -> HF Mixtral: the config and the tensor layout.

Every output tensor is a ``TensorSpec`` plus a recipe saying where it comes from:
  ("copy", llama_key)                   attention, norms, embeddings, lm_head: copied unchanged
  ("router", layer)                     ``block_sparse_moe.gate.weight`` [E, D]: a new router
  ("expert", layer, e, "w1"|"w3"|"w2")  shard / copy of the dense gate / up / down (``core.expert_weights``)
The Mixtral on-disk names (w1 = gate, w3 = up, w2 = down) appear only here.

Config: MixtralConfig's defaults differ from LlamaConfig's (rms eps 1e-5, rope theta 1e6, 128k positions), so every
such field is copied from the source, in the top-level form transformers 4.x and 5.x both read (4.57 ignores 5.x's
``rope_parameters`` and would load the default theta).
"""

from __future__ import annotations

from typing import Optional

import torch

from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.formats.safetensors_stream import TensorSpec

LAYER_COPY = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
              "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")
DENSE_MLP = {"w1": "mlp.gate_proj.weight", "w3": "mlp.up_proj.weight", "w2": "mlp.down_proj.weight"}
COPIED_CONFIG = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                 "rope_theta", "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                 "pad_token_id", "attention_dropout", "use_cache")
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                  "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02}


def mixtral_config(llama: dict, opts: UpcycleOptions, dtype: torch.dtype, source: Optional[str] = None) -> dict:
    """The Mixtral config.json for an upcycled Llama (a plain dict; transformers builds MixtralConfig from it)."""
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
    for k in COPIED_CONFIG:
        v = llama.get(k, LLAMA_DEFAULTS.get(k))
        if k == "rope_theta" and "rope_parameters" in llama and "rope_theta" not in llama:  # a 5.x-written source
            v = llama["rope_parameters"].get("rope_theta", v)
        if k == "rope_scaling" and v is None and isinstance(llama.get("rope_parameters"), dict):
            rp = {kk: vv for kk, vv in llama["rope_parameters"].items() if kk != "rope_theta"}
            v = rp if rp.get("rope_type", "default") != "default" else None
        if v is not None or k in ("rope_scaling",):
            cfg[k] = v
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    cfg.update({
        "intermediate_size": llama["intermediate_size"] // opts.granularity,
        "num_local_experts": opts.num_moe_experts,
        "num_experts_per_tok": opts.moe_router_topk,
        "router_aux_loss_coef": opts.moe_aux_loss_coeff,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "upcycling": {**opts.to_record(), "source": source, "dense_intermediate_size": llama["intermediate_size"]},
    })
    return cfg


def layout(llama: dict, opts: UpcycleOptions, dtype: torch.dtype) -> list[tuple[TensorSpec, tuple]]:
    """Every output tensor, in write order (layer by layer), with its recipe."""
    D, F, V = llama["hidden_size"], llama["intermediate_size"], llama["vocab_size"]
    H = llama["num_attention_heads"]
    KV = llama.get("num_key_value_heads") or H
    hd = llama.get("head_dim") or D // H
    E, Fe = opts.num_moe_experts, F // opts.granularity
    shapes = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
              "self_attn.q_proj.weight": (H * hd, D), "self_attn.k_proj.weight": (KV * hd, D),
              "self_attn.v_proj.weight": (KV * hd, D), "self_attn.o_proj.weight": (D, H * hd)}
    expert_shapes = {"w1": (Fe, D), "w2": (D, Fe), "w3": (Fe, D)}

    out = [(TensorSpec("model.embed_tokens.weight", (V, D), dtype), ("copy", "model.embed_tokens.weight"))]
    for i in range(llama["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for k in LAYER_COPY:
            out.append((TensorSpec(p + k, shapes[k], dtype), ("copy", p + k)))
        out.append((TensorSpec(p + "block_sparse_moe.gate.weight", (E, D), dtype), ("router", i)))
        for e in range(E):
            for w in ("w1", "w2", "w3"):
                out.append((TensorSpec(f"{p}block_sparse_moe.experts.{e}.{w}.weight", expert_shapes[w], dtype),
                            ("expert", i, e, w)))
    out.append((TensorSpec("model.norm.weight", (D,), dtype), ("copy", "model.norm.weight")))
    if not llama.get("tie_word_embeddings", False):
        out.append((TensorSpec("lm_head.weight", (V, D), dtype), ("copy", "lm_head.weight")))
    return out


def _sizes(llama: dict, opts: UpcycleOptions) -> tuple[int, ...]:
    D, F, V, L = llama["hidden_size"], llama["intermediate_size"], llama["vocab_size"], llama["num_hidden_layers"]
    H = llama["num_attention_heads"]
    KV = llama.get("num_key_value_heads") or H
    hd = llama.get("head_dim") or D // H
    return D, F // opts.granularity, V, L, H, KV, hd, opts.num_moe_experts


def num_output_tensors(llama: dict, opts: UpcycleOptions) -> int:
    """len(layout(...)) in closed form: embeddings, norm, lm_head unless tied, per layer 6 copies, router, 3E."""
    L, E = llama["num_hidden_layers"], opts.num_moe_experts
    return 2 + (not llama.get("tie_word_embeddings", False)) + L * (7 + 3 * E)


def output_bytes(llama: dict, opts: UpcycleOptions, dtype: torch.dtype) -> int:
    """sum(spec.nbytes for spec in layout(...)) in closed form: no table of E x L entries is built."""
    D, Fe, V, L, H, KV, hd, E = _sizes(llama, opts)
    per_layer = 2 * D + 2 * H * hd * D + 2 * KV * hd * D + E * D + 3 * E * Fe * D
    embed = V * D * (1 if llama.get("tie_word_embeddings", False) else 2)
    return (embed + D + L * per_layer) * dtype.itemsize


def source_keys(recipe: tuple) -> list[str]:
    """The dense Llama keys a recipe reads (to prove every source key is consumed exactly once)."""
    if recipe[0] == "copy":
        return [recipe[1]]
    if recipe[0] == "expert" and recipe[2] == 0 and recipe[3] == "w1":
        return [f"model.layers.{recipe[1]}.{k}" for k in DENSE_MLP.values()]
    return []


def parameter_counts(llama: dict, opts: UpcycleOptions) -> dict[str, int]:
    """Total and active (per token: the k routed experts) parameters of the upcycled model."""
    total = active = 0
    for spec, recipe in layout(llama, opts, torch.float32):
        n = 1
        for s in spec.shape:
            n *= s
        total += n
        if recipe[0] != "expert" or recipe[2] < opts.moe_router_topk:
            active += n
    return {"total": total, "active": active}
