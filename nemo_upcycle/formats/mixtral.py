"""Dense HF Llama -> HF Mixtral: the config and the tensor layout.

The layout is data: every output tensor is a ``TensorSpec`` plus a recipe saying where it comes from:
  ("copy", llama_key)                      attention, norms, embeddings, lm_head: copied unchanged
  ("router", layer)                        ``block_sparse_moe.gate.weight`` [E, D]: a new router
  ("expert", layer, e, "gate"|"up"|"down") that part of expert e (core.expert_weights)
The names, shapes and what each MoE tensor is made from are the key table's (``formats.keymap``).

Config: MixtralConfig's defaults differ from LlamaConfig's (rms eps 1e-5, rope theta 1e6, 128k positions),
so every such field is copied from the source, in the legacy top-level form that transformers 4.x and 5.x
both read (a 5.x-only ``rope_parameters`` loads in 4.57 with the wrong theta).
"""

from __future__ import annotations

from typing import Optional

import torch

from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.formats.keymap import (
    ATTENTION,
    DENSE_MLP,
    EMBED,
    HF_DEFAULTS,
    LM_HEAD,
    MIXTRAL_EXPERT,
    NORM,
    ROUTER,
    HFTensor,
    tensor_dims,
)
from nemo_upcycle.formats.safetensors_stream import TensorSpec

COPIED_CONFIG = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                 "rope_theta", "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                 "pad_token_id", "attention_dropout", "use_cache")
LLAMA_DEFAULTS = {**HF_DEFAULTS, "hidden_act": "silu", "initializer_range": 0.02}


def mixtral_config(llama: dict, opts: UpcycleOptions, dtype: torch.dtype, source: Optional[str] = None) -> dict:
    """The Mixtral config.json for an upcycled Llama (a plain dict; transformers builds MixtralConfig from it)."""
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **copied_config(llama)}
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


def copied_config(llama: dict) -> dict:
    """The source's config fields every MoE format copies (``COPIED_CONFIG``), with the source's defaults where it
    omits one and the legacy top-level RoPE form read from a 5.x-written source's ``rope_parameters``."""
    cfg = {}
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
    return cfg


def layout(llama: dict, opts: UpcycleOptions, dtype: torch.dtype) -> list[tuple[TensorSpec, tuple]]:
    """Every output tensor, in write order (layer by layer), with its recipe."""
    dims = tensor_dims(llama, llama["intermediate_size"] // opts.granularity, opts.num_moe_experts)

    shapes = {t: t.shape_for(dims) for t in (EMBED, NORM, LM_HEAD, ROUTER) + ATTENTION + MIXTRAL_EXPERT}  # shared

    def spec(t: HFTensor, layer=None, expert=None):
        return TensorSpec(t.key(layer, expert), shapes[t], dtype), t.recipe(layer, expert)

    out = [spec(EMBED)]
    for i in range(llama["num_hidden_layers"]):
        out += [spec(t, i) for t in ATTENTION + (ROUTER,)]
        out += [spec(t, i, e) for e in range(opts.num_moe_experts) for t in MIXTRAL_EXPERT]
    out.append(spec(NORM))
    if not llama.get("tie_word_embeddings", False):
        out.append(spec(LM_HEAD))
    return out


def num_output_tensors(llama: dict, opts: UpcycleOptions) -> int:
    """len(layout(...)) in closed form: embeddings, norm, lm_head unless tied, per layer 6 copies, router, 3E."""
    L, E = llama["num_hidden_layers"], opts.num_moe_experts
    return 2 + (not llama.get("tie_word_embeddings", False)) + L * (7 + 3 * E)


def output_bytes(llama: dict, opts: UpcycleOptions, dtype: torch.dtype) -> int:
    """sum(spec.nbytes for spec in layout(...)) in closed form: no table of E x L entries is built."""
    d = tensor_dims(llama, llama["intermediate_size"] // opts.granularity, opts.num_moe_experts)
    D, E = d["D"], d["E"]
    per_layer = 2 * D + 2 * d["Q"] * D + 2 * d["KV"] * D + E * D + 3 * E * d["Fe"] * D
    embed = d["V"] * D * (1 if llama.get("tie_word_embeddings", False) else 2)
    return (embed + D + llama["num_hidden_layers"] * per_layer) * dtype.itemsize


def source_keys(recipe: tuple) -> list[str]:
    """The dense Llama keys a recipe reads (to prove every source key is consumed exactly once)."""
    if recipe[0] == "copy":
        return [recipe[1]]
    if recipe[0] == "expert" and recipe[2] == 0 and recipe[3] == MIXTRAL_EXPERT[0].made_from:
        return [t.key(recipe[1]) for t in DENSE_MLP]
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
