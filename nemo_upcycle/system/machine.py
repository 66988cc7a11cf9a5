"""What this machine's processors can multiply fast: one home for the training precision ``auto`` picks.

bf16 pays on a CPU only with bf16 matrix instructions: x86 AMX (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``),
Arm's BF16 extension (``bf16`` in the ``Features`` of /proc/cpuinfo). Elsewhere torch emulates bf16 products through
fp32 and a bf16 run is slower than an fp32 one. GPUs: the recipes' GPUs (A100, H100, H200) all have bf16 tensor
cores, which is what Megatron's and NeMo's recipes train in (``bf16_mixed()``,
nemo/collections/llm/recipes/precision/mixed_precision.py). Reads /proc/cpuinfo only: no torch import.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # in order of preference (the reason names the first found)
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")  # trainer.precision: auto or Lightning's / NeMo's names


@lru_cache(maxsize=None)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where /proc/cpuinfo is absent."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_matrix_units(flags: Optional[frozenset] = None) -> Optional[str]:
    """The first bf16 matrix-instruction flag of the CPU, or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


def resolve_precision(requested: str, accelerator: str, flags: Optional[frozenset] = None) -> tuple[str, str]:
    """(the precision that trains, why): ``auto`` -> bf16-mixed on GPUs and on CPUs with bf16 matrix units, else
    fp32 ("32"); anything else as the recipe sets it."""
    if requested != "auto":
        return requested, "set by trainer.precision"
    if accelerator == "gpu":
        return "bf16-mixed", "auto: GPU with bf16 tensor cores (the recipes' A100 / H100 / H200)"
    unit = bf16_matrix_units(flags)
    if unit:
        return "bf16-mixed", f"auto: the CPU has bf16 matrix instructions ({unit})"
    return "32", f"auto: the CPU has no bf16 matrix instructions (none of {', '.join(BF16_CPU_FLAGS)}): fp32"
