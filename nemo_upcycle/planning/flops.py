"""Throughput arithmetic: model FLOPs per token, the peak a run is measured against, and MFU.

Model FLOPs are Megatron's (``plan.flops_per_token``: forward + backward, only the k routed experts, causal
attention counted half, the logits layer; no router, norms or softmax). MFU = achieved model FLOP/s over the
peak FLOP/s of all devices of the job:

    MFU = tokens_per_s * flops_per_token / (peak_flops_per_device * devices)

Peaks: on a GPU the dense bf16 peak of ``plan.GPUS`` (REFERENCE.md: H100 SXM 989 TFLOP/s), matched by the CUDA
device name; on a CPU a measured one: the best of a few large fp32 ``torch.mm`` with this process's thread
count (cached per process and thread count). It is what this machine's BLAS reaches on one matmul, so an
MFU near 1 on CPU means "as fast as a plain matmul", not a hardware limit. No NeMo / Megatron import.
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import torch

from nemo_upcycle.planning.plan import GPUS


def gpu_peak(device_name: str, memory_bytes: Optional[int] = None) -> tuple[Optional[float], str]:
    """The table peak for a CUDA device name (``torch.cuda.get_device_name()``); None if the table lacks it.

    "H100" / "H200" / "A100" in the name; the table holds SXM parts, so a PCIe card gets None (pass the peak)."""
    name = device_name.upper()
    if "PCIE" in name:
        return None, f"{device_name} (no peak in plan.GPUS)"
    for key in ("H200", "H100", "A100"):
        if key in name:
            if key == "A100" and memory_bytes is not None and memory_bytes < 50 * 2**30:
                key = "A100-40GB"
            return GPUS[key].peak_bf16_flops, f"{GPUS[key].name} bf16 dense"
    return None, f"{device_name} (no peak in plan.GPUS)"


@functools.lru_cache(maxsize=None)
def _cpu_peak(threads: int, n: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.mm(a, b)  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def measured_cpu_peak(n: int = 1536, repeats: int = 3) -> float:
    """FLOP/s of the fastest of ``repeats`` fp32 [n, n] @ [n, n] products with the current thread count."""
    return _cpu_peak(torch.get_num_threads(), n, repeats)


def device_peak() -> tuple[Optional[float], str]:
    """(peak FLOP/s of one device of this process, what it is): the GPU table on CUDA, else measured CPU."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return gpu_peak(props.name, props.total_memory)
    return measured_cpu_peak(), f"CPU fp32 torch.mm, {torch.get_num_threads()} threads (measured)"


def tflops(tokens_per_s: float, flops_per_token: float) -> float:
    """Achieved model TFLOP/s."""
    return tokens_per_s * flops_per_token / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization; ``peak_flops`` is the whole job's (per device x devices)."""
    return tokens_per_s * flops_per_token / peak_flops
