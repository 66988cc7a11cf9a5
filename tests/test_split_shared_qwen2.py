"""Issue 15's data-aware upcycling together with issue 14's shared experts and Qwen2 sources: the calibration pass on a
Qwen2 source against transformers' own ``Qwen2ForCausalLM``, an importance split with shared experts and a Qwen2 source
split by importance, each converted and run by transformers against the dense model (step 0 exact), with negative
controls; and the combinations that cannot keep step 0 refused in one line."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    add_tokenizer,
    calibration_file,
    llama_with_tokenizer,
    make_qwen2,
    max_logit_diff,
    mlp_inputs,
    shakespeare_text,
)
from nemo_upcycle.core import UpcycleOptions
from nemo_upcycle.errors import FieldError
from nemo_upcycle.offline.convert import convert
from nemo_upcycle.offline.verify import load_dense, load_moe

V = 300  # a BPE tokenizer of 300 ids trained on Shakespeare (tests/test_split.py does the same)
ATOL = 1e-4


@pytest.fixture(scope="module")
def qwen2_tok(tmp_path_factory):
    d = make_qwen2(tmp_path_factory.mktemp("qwen2") / "dense", vocab_size=V)
    return add_tokenizer(d, V, shakespeare_text(100_000))


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    return llama_with_tokenizer(tmp_path_factory.mktemp("llama") / "dense", V)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 29), generator=torch.Generator().manual_seed(5))


def _plan(tmp_path, opts):
    """The calibration plan convert uses (``data.calibration.calibrate``) on 1024 tokens of Shakespeare."""
    from nemo_upcycle.data.calibration import CalibrationSpec, calibrate

    f = calibration_file(tmp_path / "calib.txt")
    return lambda src: calibrate(src, opts, CalibrationSpec(files=[f], max_tokens=1024), progress=False)


@torch.no_grad()
def test_calibration_pass_matches_transformers_qwen2(qwen2_tok):
    """The layer-by-layer pass on a Qwen2 source (q/k/v biases) yields the MLP inputs ``Qwen2ForCausalLM`` computes;
    the next layer's input is the negative control."""
    from nemo_upcycle.data.dense_pass import layer_inputs
    from nemo_upcycle.formats.base import open_dense

    model = load_dense(qwen2_tok).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    segs = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (15, 8)]
    want = mlp_inputs(model, segs)
    got = {li.layer: li.x for li in layer_inputs(open_dense(qwen2_tok), segs, [1, 2], progress=False)}
    for i in (1, 2):
        ref = want[i]
        assert (got[i] - ref).abs().max() < 1e-5 * ref.abs().max()
    assert (got[1] - want[2]).abs().max() > 0.1


def test_importance_split_with_shared_experts_keeps_step0(llama_tok, ids, tmp_path):
    """G = 2, S = 2 shared slots, units dealt by importance: HF Qwen2-MoE computes the dense Llama; negative control:
    the routed experts without their share (the shared expert then counts twice)."""
    opts = UpcycleOptions(8, 4, granularity=2, shared_experts=2, expert_split="importance").validate(44)
    res = convert(llama_tok, tmp_path / "moe", opts, progress=False, make_plan=_plan(tmp_path, opts))
    rec = res.config["upcycling"]
    assert res.config["model_type"] == "qwen2_moe" and rec["step0_equivalent"] is True
    assert rec["expert_split"] == "importance" and rec["calibration"]["tokens"] == 1024
    dense, moe = load_dense(llama_tok), load_moe(res.out_dir)
    assert max_logit_diff(dense, moe, ids) < ATOL
    with torch.no_grad():
        for layer in moe.model.layers:
            for e in layer.mlp.experts:
                e.down_proj.weight.mul_(2.0)
    assert max_logit_diff(dense, moe, ids) > 1e-3


def test_qwen2_source_split_by_importance_keeps_step0(qwen2_tok, ids, tmp_path):
    opts = UpcycleOptions(4, 2, granularity=2, expert_split="importance").validate(44)
    res = convert(qwen2_tok, tmp_path / "moe", opts, progress=False, make_plan=_plan(tmp_path, opts))
    assert res.config["model_type"] == "qwen2_moe" and res.config["upcycling"]["step0_equivalent"] is True
    dense, moe = load_dense(qwen2_tok), load_moe(res.out_dir)
    assert max_logit_diff(dense, moe, ids) < ATOL
    with torch.no_grad():  # negative control: one expert's units out of place
        w = moe.model.layers[0].mlp.experts[0].gate_proj.weight
        w.copy_(w.roll(1, dims=0))
    assert max_logit_diff(dense, moe, ids) > 1e-3


def test_shared_experts_with_data_refusals(tmp_path):
    with pytest.raises(FieldError, match="shared_experts.*expert_sources.*drop one") as e:
        UpcycleOptions(4, 2, shared_experts=1, expert_sources=(str(tmp_path / "a"),)).validate(44)
    assert "\n" not in str(e.value)
    with pytest.raises(FieldError, match="not a multiple of .*granularity.*contiguous split"):
        UpcycleOptions(8, 4, granularity=2, shared_experts=1, expert_split="importance").validate(44)
    # the accepted neighbours: S a multiple of G, or the contiguous split
    UpcycleOptions(8, 4, granularity=2, shared_experts=2, expert_split="importance").validate(44)
    UpcycleOptions(8, 4, granularity=2, shared_experts=1).validate(44)
