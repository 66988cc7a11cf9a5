"""The Megatron-core MoE layer spec, chosen in one place.

``te``:    Transformer Engine modules (fused layer-norm + linear, TE attention) and grouped GEMM experts
           (``TEGroupedMLP``) -- for H100-class GPUs.
``local``: Megatron's plain modules (torch attention; experts: ``engine.experts.BatchedMLP``, a ``SequentialMLP``
           computing the local experts in batched products, or ``SequentialMLP`` itself) -- runs on the CPU.
``auto`` picks ``te`` where Transformer Engine imports and CUDA is present, else ``local``. The choice is
logged once and can be forced by the config field ``spec_backend`` or ``NEMO_UPCYCLE_SPEC=te|local``.
Mixed dense / MoE stacks (``moe_layer_freq``) use Megatron's decoder-block spec, which reads the pattern.
Also the layer-level fixes the specs need: sequence parallelism with the local spec's torch norms
(``SequenceParallelTorchNorm``), and the expert gradients of expert tensor parallelism without expert parallelism
reduced over the expert groups (``reduce_expert_grads_over_expert_groups``, called by ``engine.config``).
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


def _swap(spec, table: dict, seen=None):
    """Replace module classes (``table``: old -> new) everywhere in a (nested) spec."""
    from dataclasses import fields, is_dataclass

    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, type):
        return table.get(spec, spec)
    seen = set() if seen is None else seen
    if id(spec) in seen:
        return spec
    seen.add(id(spec))
    if isinstance(spec, (list, tuple)):
        return type(spec)(_swap(s, table, seen) for s in spec)
    if isinstance(spec, ModuleSpec):
        spec.module = _swap(spec.module, table, seen)
        spec.submodules = _swap(spec.submodules, table, seen)
    elif is_dataclass(spec):
        for f in fields(spec):
            setattr(spec, f.name, _swap(getattr(spec, f.name), table, seen))
    return spec


def reduce_expert_grads_over_expert_groups(model, config) -> int:
    """Mark every routed-expert parameter of a built model for the expert-data-parallel gradient reduction (and the
    expert optimizer, whose grad norm is summed over the expert tensor x expert x pipeline group) when the experts are
    laid out differently from the dense part. megatron-core 0.15.3 marks them (``allreduce=False``) only when EP > 1
    (megatron/core/tensor_parallel/layers.py:878/1189, transformer/moe/experts.py:232): at ETP2 with TP1 and EP1 the
    ETP shards went to the dense buffers and were summed over the dense data-parallel group, which holds the other ETP
    ranks -- each rank's shard got the sum of all shards' gradients. The predicate ``EP > 1 or ETP != TP`` is
    upstream's fix (NVIDIA/Megatron-LM pull request 5916). Returns the number of parameters marked."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    etp = config.expert_tensor_parallel_size or config.tensor_model_parallel_size
    if config.expert_model_parallel_size > 1 or etp == config.tensor_model_parallel_size:
        return 0  # stock megatron-core marks them already (EP > 1), or the dense groups are the expert groups
    n = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            for p in module.experts.parameters():
                p.allreduce = False
                n += 1
    return n


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
    if backend == "te":
        return spec
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from nemo_upcycle.engine import experts

    table = {SequentialMLP: experts.experts_module(experts.resolve(getattr(config, "expert_backend", "auto")))}
    if config.sequence_parallel:
        table[WrappedTorchNorm] = SequenceParallelTorchNorm
    return _swap(spec, table)
