"""Throughput arithmetic, one formula each: model FLOPs per token, the peak a run is measured against, and MFU.

FLOPs per token, Megatron-LM megatron/training/training.py ``num_floating_point_operations`` (not shipped with
megatron-core; re-typed): 6 [h (3|2)(F n_dense + Fe k n_moe) + L (h d (a + 2g) + a d s + a d h) + h V]
(x3 fwd/wgrad/dgrad, x2 per FMA, causal attention half; only the k routed experts; no router, norms or softmax);
equals NeMo's flops_formulas.mixtral when a d = h and the vocab matches. MFU = achieved model FLOP/s over the peak
FLOP/s of all devices of the job:

    MFU = tokens_per_s * flops_per_token / (peak_flops_per_device * devices)

Peaks are those of the precision the matmuls run in (``matmul_dtype`` of the trainer's precision: bf16-mixed -> bf16,
16-mixed -> fp16, 32 -> fp32). On a GPU the dense peaks of ``GPUS`` (vendor data sheets: H100 SXM 989 TFLOP/s
bf16 / fp16), matched by the CUDA device name; an fp32 run is measured against the fp32 peak of the units it uses:
TF32 tensor cores (dense, H100 SXM 494.5 TFLOP/s) when torch allows TF32 matmuls, else the FP32 CUDA cores (67 TFLOP/s;
torch's default float32 matmul precision, which NeMo does not change). On a CPU a measured peak: the best of a few
large ``torch.mm`` in that dtype with this process's thread count (cached per process, thread count and dtype), so
an MFU near 1 on CPU means "as fast as a plain matmul of that precision", not a hardware limit. No NeMo / Megatron
import; torch only where a peak is measured.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple, Optional

from nemo_upcycle.planning.layout import ModelDims


class GPU(NamedTuple):
    name: str
    memory_bytes: int  # as nvidia-smi reports it
    peak_bf16_flops: float  # dense, no sparsity (fp16 the same on these parts)
    peak_tf32_flops: float  # dense TF32 tensor cores
    peak_fp32_flops: float  # FP32 CUDA cores (no tensor cores)


GPUS = {"H100": GPU("H100 SXM 80GB", 81559 * 2**20, 989e12, 494.5e12, 67e12),
        "H200": GPU("H200 141GB", 143771 * 2**20, 989e12, 494.5e12, 67e12),
        "A100": GPU("A100 80GB", 81920 * 2**20, 312e12, 156e12, 19.5e12),
        "A100-40GB": GPU("A100 40GB", 40960 * 2**20, 312e12, 156e12, 19.5e12)}


def matmul_dtype(precision) -> str:
    """"bf16" | "fp16" | "fp32": what the matmuls of a Lightning / NeMo precision ("bf16-mixed", "16-mixed", "32",
    "32-true", ...) run in."""
    p = str(precision)
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16") or p.startswith("fp16"):
        return "fp16"
    return "fp32"


def table_peak(gpu: GPU, precision="bf16-mixed", tf32: bool = False) -> tuple[float, str]:
    """(peak FLOP/s, its name) of a table GPU for the precision its matmuls run in (``tf32``: fp32 matmuls allowed
    to use TF32 tensor cores, ``torch.backends.cuda.matmul.allow_tf32``)."""
    dtype = matmul_dtype(precision)
    if dtype != "fp32":
        return gpu.peak_bf16_flops, f"{gpu.name} {dtype} dense"
    if tf32:
        return gpu.peak_tf32_flops, f"{gpu.name} tf32 dense"
    return gpu.peak_fp32_flops, f"{gpu.name} fp32 (CUDA cores, no TF32)"


def flops_per_token(m: ModelDims, seq_length: int, tp: Optional[int] = None) -> float:
    """Megatron's model FLOPs (fwd + bwd) per token: k routed experts, causal attention, logits; ``tp`` pads the
    vocab as NeMo does for a tokenizer-sized vocab (None: as given)."""
    h, d, a, g, L = m.hidden_size, m.kv_channels, m.num_attention_heads, m.num_query_groups, m.num_layers
    n_moe, w = sum(m.moe_pattern()), 3 if m.gated_linear_unit else 2
    Fs = m.moe_shared_expert_intermediate_size or 0  # every token visits the shared expert (Megatron counts it too)
    mlp = h * w * (m.ffn_hidden_size * (L - n_moe) + (m.moe_ffn_hidden_size * m.moe_router_topk + Fs) * n_moe)
    attn = L * (h * d * (a + 2 * g) + a * d * seq_length + a * d * h)
    return 6.0 * (mlp + attn + h * m.padded_vocab(tp))


def tflops(tokens_per_s: float, flops_per_token: float) -> float:
    """Achieved model TFLOP/s."""
    return tokens_per_s * flops_per_token / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization; ``peak_flops`` is the whole job's (per device x devices)."""
    return tokens_per_s * flops_per_token / peak_flops


def tokens_per_s(mfu: float, flops_per_token: float, peak_flops: float) -> float:
    """The tokens/s that reach ``mfu`` of ``peak_flops`` (the inverse of :func:`mfu`)."""
    return mfu * peak_flops / flops_per_token


def gpu_peak(device_name: str, memory_bytes: Optional[int] = None, precision="bf16-mixed",
             tf32: bool = False) -> tuple[Optional[float], str]:
    """The table peak for a CUDA device name (``torch.cuda.get_device_name()``) and precision (``table_peak``); None
    if the table lacks the device.

    "H100" / "H200" / "A100" in the name; the table holds SXM parts, so a PCIe card gets None (pass the peak)."""
    name = device_name.upper()
    if "PCIE" in name:
        return None, f"{device_name} (no peak in plan.GPUS)"
    for key in ("H200", "H100", "A100"):
        if key in name:
            if key == "A100" and memory_bytes is not None and memory_bytes < 50 * 2**30:
                key = "A100-40GB"
            return table_peak(GPUS[key], precision, tf32)
    return None, f"{device_name} (no peak in plan.GPUS)"


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@functools.lru_cache(maxsize=None)
def _cpu_peak(threads: int, n: int, repeats: int, dtype: str = "fp32") -> float:
    import torch  # deferred: plan mode and the precheck import planning without torch

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(getattr(torch, _TORCH_DTYPES[dtype])) for _ in range(2))
    torch.mm(a, b)  # warm-up: thread pool, page faults, the kernel picked for this dtype
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def measured_cpu_peak(n: int = 1536, repeats: int = 3, dtype: str = "fp32") -> float:
    """FLOP/s of the fastest of ``repeats`` [n, n] @ [n, n] products in ``dtype`` ("bf16", "fp16", "fp32") with the
    current thread count."""
    import torch

    return _cpu_peak(torch.get_num_threads(), n, repeats, dtype)


def device_peak(precision="32") -> tuple[Optional[float], str]:
    """(peak FLOP/s of one device of this process, what it is) for the precision that runs (the trainer's
    ``precision``): the GPU table on CUDA, else measured on the CPU in that precision's matmul dtype."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return gpu_peak(props.name, props.total_memory, precision, tf32=torch.backends.cuda.matmul.allow_tf32)
    dtype = matmul_dtype(precision)
    threads = torch.get_num_threads()
    return measured_cpu_peak(dtype=dtype), f"CPU {dtype} torch.mm, {threads} threads (measured)"
