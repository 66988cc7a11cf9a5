"""The upcycling core: pure PyTorch on tensors and state dicts. Nothing here imports NeMo or Megatron."""

from nemo_upcycle.core.options import UpcycleOptions, resolve_moe_layers, step0_report
from nemo_upcycle.core.routing import route
from nemo_upcycle.core.upcycle import ExpertWeights, LayerExperts, expert_weights, router_weight, scaling_exponents

__all__ = [
    "UpcycleOptions", "resolve_moe_layers", "step0_report", "route",
    "ExpertWeights", "LayerExperts", "expert_weights", "router_weight", "scaling_exponents",
]
