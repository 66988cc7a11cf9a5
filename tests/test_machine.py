"""``trainer.precision=auto`` (system/machine.py): bf16-mixed where the processor multiplies bf16 in hardware.

The CPU's flags are read from /proc/cpuinfo (compared here with what torch itself reports about the same CPU:
``torch.backends.cpu.get_cpu_capability()`` names AVX-512 when the kernel lists avx512 flags); the choice is checked
on synthetic flag sets for every branch, and through the recipe validation (the embedded default asks for auto).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nemo_upcycle.system.machine import BF16_CPU_FLAGS, bf16_matrix_units, cpu_flags, resolve_precision


def test_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert "bf16" in cpu_flags(str(arm))
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_this_machine_agrees_with_torch():
    import torch

    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo")
    cap = torch.backends.cpu.get_cpu_capability()  # torch's own dispatch level for this CPU
    flags = cpu_flags()
    assert ("avx512f" in flags) == cap.startswith("AVX512"), (cap, sorted(flags)[:10])


@pytest.mark.parametrize("flags, want", [
    ({"avx2", "amx_bf16", "avx512_bf16"}, ("bf16-mixed", "amx_bf16")),
    ({"avx2", "avx512f", "avx512_bf16"}, ("bf16-mixed", "avx512_bf16")),
    ({"fp", "asimd", "bf16"}, ("bf16-mixed", "bf16")),
    ({"avx2", "avx512f"}, ("32", "no bf16")),  # control: AVX-512 without BF16 emulates bf16 through fp32
    (set(), ("32", "no bf16")),
])
def test_auto_choice(flags, want):
    precision, reason = resolve_precision("auto", "cpu", frozenset(flags))
    assert precision == want[0] and want[1] in reason
    assert bf16_matrix_units(frozenset(flags)) == (want[1] if want[0] != "32" else None)


def test_gpu_and_explicit():
    assert resolve_precision("auto", "gpu", frozenset())[0] == "bf16-mixed"
    assert resolve_precision("32", "cpu", frozenset({"amx_bf16"})) == ("32", "set by trainer.precision")
    assert resolve_precision("bf16-mixed", "cpu", frozenset()) == ("bf16-mixed", "set by trainer.precision")
    assert set(BF16_CPU_FLAGS) == {"amx_bf16", "avx512_bf16", "bf16"}


def test_recipe_validation_resolves_auto():
    from nemo_upcycle.config.compose import compose

    want = resolve_precision("auto", "cpu")
    run = compose("smollm2_135m_upcycle", [])  # the embedded default asks for auto
    assert (run.trainer.precision, run.trainer.precision_reason) == want
    run = compose("tiny_llama_upcycle", ["trainer.precision=32"])
    assert run.trainer.precision == "32" and run.trainer.precision_reason == "set by trainer.precision"
