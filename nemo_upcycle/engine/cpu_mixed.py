"""Mixed precision (bf16-mixed, 16-mixed) on a machine without CUDA, through the path GPU recipes use.

NeMo's ``bf16_mixed()`` plugin wraps the bf16 model in Megatron's ``Float16Module`` and its optimizer is
``Float16OptimizerWithFloat16Params`` (fp32 main parameters; gradients reduced in fp32). Three CUDA assumptions
stand in the way (megatron-core 0.15.3 under megatron/core/, 0.16.0's lines in parentheses where they moved), each
bypassed as ``engine.cpu`` bypasses its sites, applied by ``cpu.enable_cpu_support`` (only without CUDA, only on the
supported stacks of ``engine/cpu_sites.py``):
  * optimizer/optimizer.py:667/686 (671/690) sort the parameters by ``param.type()`` against the CUDA type names only
    ('torch.cuda.BFloat16Tensor' -> bf16 model parameter with an fp32 main copy, 'torch.cuda.FloatTensor' -> fp32
    parameter, anything else: TypeError "Wrapped parameters must be one of torch.cuda.FloatTensor, ..."). Inside that
    constructor's own body a CPU tensor's ``type()`` reports the CUDA name of the same dtype (``_TYPE_NAMED``), so
    CPU parameters take the branches they take on a GPU; nothing else (the copies it makes, the optimizer it wraps)
    is touched.
  * tensor_parallel/layers.py:46 the fused weight-gradient kernel (Apex) is CUDA-only: ``_WgradAccum`` stands in,
    enabled by ``cpu_bf16_config_overrides()`` in bf16 model configs.
  * optimizer/grad_scaler.py: 16-mixed's loss scaler keeps its tensors on 'cuda' (``MIXED_SCOPED``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys

import torch
from torch.overrides import TorchFunctionMode

MC = "megatron.core."


def _resolve(module: str, qualname: str):  # as engine/cpu.py's (which imports this module)
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _codes(code) -> list:
    """A code object and those of the functions defined inside it."""
    return [code, *(c for const in code.co_consts if inspect.iscode(const) for c in _codes(const))]


_TYPE_AS_CUDA: list[frozenset] = []  # code objects whose Tensor.type() calls are answered with the CUDA name now


class _CpuTypeAsCuda(TorchFunctionMode):
    """``tensor.type()`` (no argument) of a CPU tensor, called directly by a function in ``_TYPE_AS_CUDA``:
    ``torch.<X>Tensor`` -> ``torch.cuda.<X>Tensor``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        caller = sys._getframe(1).f_code
        if (func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str)
                and args[0].device.type == "cpu" and any(caller in codes for codes in _TYPE_AS_CUDA)):
            return out.replace("torch.", "torch.cuda.", 1)
        return out


def _scope_type_names(module: str, qualname: str) -> None:
    """Wrap ``module.qualname`` so ``Tensor.type()`` written in its body names CPU tensors as CUDA ones."""
    owner, name = _resolve(module, qualname)
    fn = getattr(owner, name)
    codes = frozenset(_codes(inspect.unwrap(fn).__code__))

    @functools.wraps(fn)
    def cpu_as_cuda_types(*args, **kwargs):
        _TYPE_AS_CUDA.append(codes)
        try:
            with _CpuTypeAsCuda():
                return fn(*args, **kwargs)
        finally:
            _TYPE_AS_CUDA.pop()

    setattr(owner, name, cpu_as_cuda_types)


_TYPE_NAMED = [
    # optimizer/optimizer.py:667/686/691 (671/690/695) the bf16 / fp32 parameter split of the mixed-precision optimizer
    (MC + "optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
]


class _WgradAccum:
    """Stands in for Apex's ``fused_weight_gradient_mlp_cuda`` (tensor_parallel/layers.py:46, called at :561/:565
    (569/573) when ``gradient_accumulation_fusion``): a linear layer's weight gradient [out, in] = grad_output[N, out]^T
    input[N, in] computed from the bf16 tensors in fp32 (a bf16 x bf16 product is exact in fp32) and added straight
    into ``main_grad``, as the fused GEMM of GPU recipes does, instead of a bf16 GEMM whose result is rounded to bf16
    before DDP adds it. The rounding would otherwise depend on how tokens are grouped into GEMMs: an expert's gradient
    is one GEMM over both ranks' tokens at EP=2, one per micro-batch on one rank."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t().float(), total_input.float())

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):  # a bf16 / fp16 main_grad (no fp32 reduce)
        main_grad.add_(grad_output.t().float() @ total_input.float())


# (module, function, callees) that ``cpu.enable_cpu_support`` redirects to the CPU as its ``_SCOPED``: the loss scaler
# of 16-mixed (fp16)
MIXED_SCOPED = [
    # optimizer/grad_scaler.py:15 the scale, :88/91/94 min scale, growth and backoff factors on device='cuda',
    # :140 the loaded scale moved to current_device()
    (MC + "optimizer.grad_scaler", "MegatronGradScaler.__init__", ()),
    (MC + "optimizer.grad_scaler", "DynamicGradScaler.__init__", ()),
    (MC + "optimizer.grad_scaler", "DynamicGradScaler.load_state_dict", ()),
]


def enable_mixed_precision_sites() -> None:
    """Apply the sites above but ``MIXED_SCOPED`` (called by ``cpu.enable_cpu_support``, which scopes those: only
    without CUDA, pinned versions checked)."""
    for module, qualname in _TYPE_NAMED:
        _scope_type_names(module, qualname)
    layers = importlib.import_module(MC + "tensor_parallel.layers")
    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = _WgradAccum
        layers._grad_accum_fusion_available = True


def cpu_bf16_config_overrides() -> dict:
    """Model config fields for bf16-mixed on CPU, on top of ``cpu_config_overrides``: weight gradients accumulated in
    fp32 (``_WgradAccum``), as NeMo's GPTConfig enables it where the fused kernel imports (GPU recipes, with TE too:
    ``fuse_wgrad_accumulation``). Costs up to ~2x in a linear layer's backward here (an fp32 GEMM instead of bf16)."""
    return dict(gradient_accumulation_fusion=True)


