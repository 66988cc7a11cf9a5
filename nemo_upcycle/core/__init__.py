"""The upcycling core: pure PyTorch on tensors and state dicts. Nothing here imports NeMo or Megatron."""

from nemo_upcycle.core.options import UpcycleOptions, resolve_moe_layers, step0_report
from nemo_upcycle.core.routing import moe_mlp, route, swiglu_expert
from nemo_upcycle.core.upcycle import (
    ExpertWeights,
    LayerExperts,
    expert_weights,
    iter_experts,
    router_weight,
    scaling_exponents,
    upcycle_mlp,
)

__all__ = [
    "UpcycleOptions", "resolve_moe_layers", "step0_report", "route", "moe_mlp", "swiglu_expert",
    "ExpertWeights", "LayerExperts", "expert_weights", "iter_experts", "router_weight", "scaling_exponents", "upcycle_mlp",
]
