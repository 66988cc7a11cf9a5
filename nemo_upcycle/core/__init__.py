"""The upcycling core: pure PyTorch on tensors and state dicts. Nothing here imports NeMo or Megatron.

``options`` is plain Python: the planning layer reads its rules without importing torch, so the tensor math
(``upcycle``, ``routing``) is imported on first use of one of its names here.
"""

import importlib

from nemo_upcycle.core.options import UpcycleOptions, resolve_moe_layers, step0_report

_TENSOR_MATH = {"route": "routing",
                **{name: "upcycle" for name in ("ExpertWeights", "LayerExperts", "expert_weights", "router_weight",
                                                "scaling_exponents")}}

__all__ = ["UpcycleOptions", "resolve_moe_layers", "step0_report", *_TENSOR_MATH]


def __getattr__(name: str):
    """``from nemo_upcycle.core import route``: the tensor math, imported when first asked for (torch is slow)."""
    if name in _TENSOR_MATH:
        return getattr(importlib.import_module(f"nemo_upcycle.core.{_TENSOR_MATH[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
