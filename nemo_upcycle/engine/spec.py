"""The Megatron-core MoE layer spec, chosen in one place.

``te``:    Transformer Engine modules (fused layer-norm + linear, TE attention) and grouped GEMM experts
           (``TEGroupedMLP``) -- for H100-class GPUs.
``local``: Megatron's plain modules (``SequentialMLP`` experts, torch attention) -- runs on the CPU.
``auto`` picks ``te`` where Transformer Engine imports and CUDA is present, else ``local``. The choice is
logged once and can be forced by the config field ``spec_backend`` or ``NEMO_UPCYCLE_SPEC=te|local``.
Mixed dense / MoE stacks (``moe_layer_freq``) use Megatron's decoder-block spec, which reads the pattern.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache

import torch

from nemo_upcycle.errors import UpcycleError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "te", "local")


@lru_cache(maxsize=None)
def te_importable() -> bool:
    """Transformer Engine's PyTorch extension imports (it needs libcuda)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # an install without its CUDA libraries fails here with various errors
        return False
    return True


def te_available() -> bool:
    """Transformer Engine imports and a GPU is visible: the TE spec can run."""
    return torch.cuda.is_available() and te_importable()


@lru_cache(maxsize=None)
def _announce(backend: str, why: str) -> None:
    log.info("nemo-upcycle MoE layer spec: %s (%s)", backend, why)


def resolve_backend(requested: str = "auto") -> str:
    requested = os.environ.get("NEMO_UPCYCLE_SPEC", requested) or "auto"
    if requested not in BACKENDS:
        raise UpcycleError(f"spec backend {requested!r} is not one of {', '.join(BACKENDS)}.")
    if requested == "te" and not te_available():
        raise UpcycleError("spec_backend 'te' needs Transformer Engine and a CUDA GPU; "
                           "use spec_backend=local on this machine.")
    if requested == "auto":
        backend = "te" if te_available() else "local"
        _announce(backend, "auto: " + ("Transformer Engine and CUDA found" if backend == "te"
                                       else "no Transformer Engine or no CUDA"))
        return backend
    _announce(requested, "requested")
    return requested


class SequenceParallelTorchNorm:
    """torch's RMSNorm / LayerNorm for the local spec under sequence parallelism, which Megatron's
    ``WrappedTorchNorm`` refuses (megatron/core/transformer/torch_norm.py). The norm itself is the same; what
    sequence parallelism needs is that each rank's weight gradient (from its slice of the sequence) is summed over
    the tensor-parallel group: Megatron's ``finalize_model_grads`` does that for parameters marked
    ``sequence_parallel`` (as Transformer Engine's norms are)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps)
        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}.get(config.normalization)
        if norm_cls is None:
            raise UpcycleError(f"normalization {config.normalization!r} with sequence parallelism needs Transformer "
                               "Engine; use RMSNorm or LayerNorm with the local spec.")
        norm = norm_cls(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm


def _swap_norms(spec, seen=None):
    """Replace Megatron's ``WrappedTorchNorm`` by ``SequenceParallelTorchNorm`` everywhere in a (nested) spec."""
    from dataclasses import fields, is_dataclass

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    seen = set() if seen is None else seen
    if isinstance(spec, type) or id(spec) in seen:
        return spec
    seen.add(id(spec))
    if isinstance(spec, (list, tuple)):
        return type(spec)(_swap_norms(s, seen) for s in spec)
    if isinstance(spec, ModuleSpec):
        spec.module = _swap_norms(spec.module, seen)
        spec.submodules = _swap_norms(spec.submodules, seen)
    elif is_dataclass(spec) and not isinstance(spec, type):
        for f in fields(spec):
            setattr(spec, f.name, _swap_norms(getattr(spec, f.name), seen))
    return spec


def moe_layer_spec(config, vp_stage=None):
    """NeMo ``transformer_layer_spec`` callable: the decoder-block spec for this config's backend."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    backend = resolve_backend(getattr(config, "spec_backend", "auto"))
    if backend == "te":
        config.moe_grouped_gemm = True if config.num_moe_experts else config.moe_grouped_gemm
    elif config.moe_grouped_gemm:
        config.moe_grouped_gemm = False  # the local grouped GEMM needs CUDA kernels; SequentialMLP instead
    kwargs = {"vp_stage": vp_stage} if vp_stage is not None else {}
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=backend == "te",
                                      normalization=config.normalization, **kwargs)
    return _swap_norms(spec) if backend == "local" and config.sequence_parallel else spec
