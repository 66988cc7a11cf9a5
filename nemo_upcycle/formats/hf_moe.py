"""The HF MoE formats an upcycled model is written in, and which one holds a given model.

``mixtral`` (``formats.mixtral``, transformers ``MixtralForCausalLM``) holds every layer as an MoE with routed experts
only and no attention biases; ``qwen2_moe`` (``formats.qwen2_moe``, ``Qwen2MoeForCausalLM``) also holds a shared expert
with its gate, layers that stay dense and q/k/v biases, but (transformers 4.57) only head_dim = hidden / heads.
``choose(dense, opts, requested)``: ``auto`` picks Mixtral when it can hold the model and Qwen2-MoE otherwise; a
requested format that cannot hold the model, or a model neither holds, is a one-line ``UpcycleError`` naming why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from nemo_upcycle.core.options import UpcycleOptions, resolve_moe_layers
from nemo_upcycle.core.shared import shared_count
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats import mixtral, qwen2_moe
from nemo_upcycle.formats.keymap import KEYMAP, QWEN2_MOE_KEYMAP, KeyMap, has_qkv_bias

FORMAT_CHOICES = ("auto", "mixtral", "qwen2_moe")


@dataclass(frozen=True)
class HFMoEFormat:
    """One HF MoE format: its config, its layout (recipes) and their closed forms."""

    name: str
    model_type: str
    architecture: str
    config: Callable
    layout: Callable
    num_output_tensors: Callable
    output_bytes: Callable
    source_keys: Callable
    keymap: KeyMap  # Megatron <-> this format's HF names (the export reads the model through it)


FORMATS = {
    "mixtral": HFMoEFormat("mixtral", "mixtral", "MixtralForCausalLM", mixtral.mixtral_config, mixtral.layout,
                           mixtral.num_output_tensors, mixtral.output_bytes, mixtral.source_keys, KEYMAP),
    "qwen2_moe": HFMoEFormat("qwen2_moe", qwen2_moe.MODEL_TYPE, "Qwen2MoeForCausalLM", qwen2_moe.qwen2_moe_config,
                             qwen2_moe.layout, qwen2_moe.num_output_tensors, qwen2_moe.output_bytes,
                             qwen2_moe.source_keys, QWEN2_MOE_KEYMAP),
}
BY_MODEL_TYPE = {f.model_type: f for f in FORMATS.values()}


def mixtral_problem(dense: dict, opts: UpcycleOptions) -> Optional[str]:
    """Why HF Mixtral cannot hold the upcycled model (None: it can)."""
    L = dense["num_hidden_layers"]
    if shared_count(opts):
        return "HF Mixtral has no shared expert"
    n = len(resolve_moe_layers(opts.moe_layers, L))
    if n != L:
        return f"the MoE covers {n} of {L} layers and HF Mixtral has no dense layers"
    if has_qkv_bias(dense):
        return "the source's attention has q/k/v biases and HF Mixtral's has none"
    return None


def qwen2_moe_problem(dense: dict, opts: UpcycleOptions) -> Optional[str]:
    """Why HF Qwen2-MoE cannot hold the upcycled model (None: it can)."""
    H, D = dense["num_attention_heads"], dense["hidden_size"]
    hd = dense.get("head_dim")
    if hd is not None and hd * H != D:
        return (f"the source's head_dim {hd} x {H} heads is not its hidden size {D}, which transformers' "
                "Qwen2MoeAttention requires")
    return None


def choose(dense: dict, opts: UpcycleOptions, requested: str = "auto", flag: str = "--format") -> HFMoEFormat:
    """The format to write (see the module docstring)."""
    if requested not in FORMAT_CHOICES:
        raise UpcycleError(f"{flag} {requested!r} is not one of {', '.join(FORMAT_CHOICES)}.")
    problems = {"mixtral": mixtral_problem(dense, opts), "qwen2_moe": qwen2_moe_problem(dense, opts)}
    if requested != "auto":
        why = problems[requested]
        if why:
            other = [n for n, p in problems.items() if p is None]
            fix = f"use {flag} {other[0]} (or auto)" if other else "no HF MoE format holds this model"
            raise UpcycleError(f"{flag} {requested} cannot hold this model: {why}; {fix}.")
        return FORMATS[requested]
    for name in ("mixtral", "qwen2_moe"):
        if problems[name] is None:
            return FORMATS[name]
    raise UpcycleError(f"no HF MoE format holds this model: {problems['mixtral']}, and {problems['qwen2_moe']}; "
                       "change the source or the MoE options.")
