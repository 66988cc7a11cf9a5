"""Dense Llama / Qwen2 -> HF Qwen2-MoE (transformers ``Qwen2MoeForCausalLM``): the config and the tensor layout.

Qwen2-MoE holds what HF Mixtral cannot: a shared expert with its sigmoid gate, layers that stay dense
(``mlp_only_layers``, so Megatron's ``moe_layer_freq`` / ``--moe-layers every:N`` and explicit lists export), q/k/v
biases (``qkv_bias``) and softmax-then-top-k routing with or without renormalisation (``norm_topk_prob``).

Routing (transformers ``Qwen2MoeSparseMoeBlock``: softmax over E, top-k, divide by the sum when ``norm_topk_prob``):
Megatron's top-k-then-softmax equals softmax, top-k, renormalise, so ``norm_topk_prob`` is the options' ``renormalize``
in both orders; a sigmoid score function has no HF form and is recorded in ``upcycling`` for verify to replay.

Shared expert: HF always multiplies it by ``sigmoid(shared_expert_gate . x)``. The gate is written as zeros (1/2 at
step 0) and the shared expert's down projection is built for that value (``core.shared``): a model trained without
Megatron's gate is exported with a zero gate and its down projection doubled (``hf_shared_down``). Without shared
experts the shared expert has 0 units (empty tensors) and adds exactly 0.

Layout recipes (as ``formats.mixtral``): ("copy", key), ("router", layer), ("expert", layer, e, part),
("shared", layer, part) with part gate / up / down / expert_gate. The config is written in the legacy top-level form
(``rope_theta``, ``rope_scaling``) that transformers 4.57 reads and 5.x converts; ``layer_types`` is written for 5.x.
"""

from __future__ import annotations

from typing import Optional

import torch

from nemo_upcycle.core.options import UpcycleOptions, resolve_moe_layers
from nemo_upcycle.core.shared import GATE_AT_INIT, shared_intermediate_size
from nemo_upcycle.formats.keymap import (
    ATTENTION,
    DENSE_MLP,
    EMBED,
    LM_HEAD,
    NORM,
    QKV_BIAS,
    QWEN_EXPERT,
    QWEN_ROUTER,
    QWEN_SHARED,
    HFTensor,
    has_qkv_bias,
    tensor_dims,
)
from nemo_upcycle.formats.mixtral import copied_config
from nemo_upcycle.formats.safetensors_stream import TensorSpec

MODEL_TYPE = "qwen2_moe"


def qwen2_moe_config(dense: dict, opts: UpcycleOptions, dtype: torch.dtype, source: Optional[str] = None) -> dict:
    """The Qwen2-MoE config.json for an upcycled dense model (a plain dict)."""
    L, F = dense["num_hidden_layers"], dense["intermediate_size"]
    moe = set(resolve_moe_layers(opts.moe_layers, L))
    cfg = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": MODEL_TYPE, **copied_config(dense)}
    cfg.pop("head_dim", None)  # 4.57's Qwen2MoeAttention derives it (hidden / heads) and refuses any other value
    cfg.update({
        "intermediate_size": F,  # the layers that stay dense
        "moe_intermediate_size": F // opts.granularity,
        "shared_expert_intermediate_size": shared_intermediate_size(opts, F),
        "num_experts": opts.num_moe_experts,
        "num_experts_per_tok": opts.moe_router_topk,
        "norm_topk_prob": opts.renormalize,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(L) if i not in moe],
        "qkv_bias": has_qkv_bias(dense),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": L,
        "layer_types": ["full_attention"] * L,
        "router_aux_loss_coef": opts.moe_aux_loss_coeff,
        "output_router_logits": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "upcycling": {**opts.to_record(), "source": source, "dense_intermediate_size": F,
                      "moe_shared_expert_intermediate_size": shared_intermediate_size(opts, F) or None},
    })
    return cfg


def hf_shared_down(down: torch.Tensor, megatron_gate: bool) -> torch.Tensor:
    """A Megatron shared expert's down projection as HF Qwen2-MoE holds it: HF's gate is zero (1/2) when Megatron has
    none, so the projection is doubled; with Megatron's gate, unchanged."""
    return down if megatron_gate else (down.float() / GATE_AT_INIT).to(down.dtype)


def layout(dense: dict, opts: UpcycleOptions, dtype: torch.dtype) -> list[tuple[TensorSpec, tuple]]:
    """Every output tensor, in write order (layer by layer), with its recipe."""
    F = dense["intermediate_size"]
    dims = tensor_dims(dense, F // opts.granularity, opts.num_moe_experts, shared_intermediate_size(opts, F))
    L = dense["num_hidden_layers"]
    moe = set(resolve_moe_layers(opts.moe_layers, L))
    attention = ATTENTION + (QKV_BIAS if has_qkv_bias(dense) else ())

    def spec(t: HFTensor, layer=None, expert=None):
        return TensorSpec(t.key(layer, expert), t.shape_for(dims), dtype), t.recipe(layer, expert)

    out = [spec(EMBED)]
    for i in range(L):
        out += [spec(t, i) for t in attention]
        if i in moe:
            out.append(spec(QWEN_ROUTER, i))
            out += [spec(t, i, e) for e in range(opts.num_moe_experts) for t in QWEN_EXPERT]
            out += [spec(t, i) for t in QWEN_SHARED]
        else:
            out += [spec(t, i) for t in DENSE_MLP]
    out.append(spec(NORM))
    if not dense.get("tie_word_embeddings", False):
        out.append(spec(LM_HEAD))
    return out


def num_output_tensors(dense: dict, opts: UpcycleOptions) -> int:
    """len(layout(...)) in closed form."""
    L, E = dense["num_hidden_layers"], opts.num_moe_experts
    n_moe = len(resolve_moe_layers(opts.moe_layers, L))
    attention = len(ATTENTION) + (len(QKV_BIAS) if has_qkv_bias(dense) else 0)
    per_moe = 1 + len(QWEN_EXPERT) * E + len(QWEN_SHARED)
    return 2 + (not dense.get("tie_word_embeddings", False)) + L * attention + n_moe * per_moe + (L - n_moe) * 3


def output_bytes(dense: dict, opts: UpcycleOptions, dtype: torch.dtype) -> int:
    """sum(spec.nbytes for spec in layout(...)) in closed form."""
    F = dense["intermediate_size"]
    d = tensor_dims(dense, F // opts.granularity, opts.num_moe_experts, shared_intermediate_size(opts, F))
    D, E, L = d["D"], d["E"], dense["num_hidden_layers"]
    n_moe = len(resolve_moe_layers(opts.moe_layers, L))
    attn = 2 * D + 2 * d["Q"] * D + 2 * d["KV"] * D + ((d["Q"] + 2 * d["KV"]) if has_qkv_bias(dense) else 0)
    moe = E * D + 3 * E * d["Fe"] * D + 3 * d["Fs"] * D + D
    embed = d["V"] * D * (1 if dense.get("tie_word_embeddings", False) else 2)
    return (embed + D + L * attn + n_moe * moe + (L - n_moe) * 3 * F * D) * dtype.itemsize


def source_keys(recipe: tuple) -> list[str]:
    """The dense keys a recipe reads (to prove every source key is consumed exactly once): a copy its key; the
    router of a MoE layer stands for the dense MLP the layer's experts and shared expert are made from."""
    if recipe[0] == "copy":
        return [recipe[1]]
    if recipe[0] == "router":
        return [t.key(recipe[1]) for t in DENSE_MLP]
    return []
