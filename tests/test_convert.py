"""Upcycled tiny Llamas, loaded by transformers' MixtralForCausalLM, against transformers' LlamaForCausalLM.

The reference is the dense model itself, run by code nobody here wrote. Every function-preserving setting
must agree within 1e-5 in fp32; each negative control shows the same check failing.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import load_llama, load_mixtral, max_logit_diff
from nemo_upcycle.core import UpcycleOptions, step0_report
from nemo_upcycle.offline.convert import convert

ATOL = 1e-5
FAIL = 1e-3  # a negative control must be off by at least this much

PRESERVING = [(E, k, G) for E in (2, 4, 8) for k in (1, 2, 4) for G in (1, 2, 4)
              if k <= E and E % G == 0 and G <= E and (G == 1 or k % G == 0)]


@pytest.mark.parametrize("E,k,G", PRESERVING, ids=[f"E{E}-k{k}-G{G}" for E, k, G in PRESERVING])
def test_function_preserving(tiny_llama, tmp_path, token_ids, E, k, G):
    opts = UpcycleOptions(num_moe_experts=E, moe_router_topk=k, granularity=G, scaling="exact")
    assert step0_report(opts)[0]
    out = convert(tiny_llama, tmp_path / "moe", opts, progress=False).out_dir
    diff = max_logit_diff(load_llama(tiny_llama), load_mixtral(out), token_ids)
    assert diff < ATOL, f"E{E} k{k} G{G}: max |dlogit| {diff:.2e}"


def test_tied_embeddings(tiny_llama_tied, tmp_path, token_ids):
    out = convert(tiny_llama_tied, tmp_path / "moe", UpcycleOptions(8, 2), progress=False).out_dir
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    diff = max_logit_diff(load_llama(tiny_llama_tied), load_mixtral(out), token_ids)
    assert diff < ATOL, f"tied: max |dlogit| {diff:.2e}"


def test_rope_scaling_and_config_copied(tmp_path, token_ids):
    """Llama 3.1 rope scaling, rms eps and max positions survive (Mixtral's defaults differ)."""
    from helpers import make_llama

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    dense = make_llama(tmp_path / "dense", seed=3, rope_scaling=rope, rms_norm_eps=1e-6, max_position_embeddings=48)
    out = convert(dense, tmp_path / "moe", UpcycleOptions(4, 2), progress=False).out_dir
    moe = load_mixtral(out)
    assert moe.config.rope_scaling["rope_type"] == "llama3"
    assert moe.config.rope_theta == 500000.0 and moe.config.rms_norm_eps == 1e-6
    assert moe.config.max_position_embeddings == 48
    ids = torch.randint(0, 99, (1, 40), generator=torch.Generator().manual_seed(1))  # past the original 16
    assert max_logit_diff(load_llama(dense), moe, ids) < ATOL


def test_sharded_output_and_bf16(tiny_llama, tmp_path, token_ids):
    res = convert(tiny_llama, tmp_path / "moe", UpcycleOptions(4, 2), dtype="bfloat16", max_shard_bytes=20_000,
                  progress=False)
    index = json.loads((res.out_dir / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((res.out_dir / f).is_file() for f in files)
    from transformers import MixtralForCausalLM

    moe = MixtralForCausalLM.from_pretrained(res.out_dir, dtype=torch.bfloat16)
    dense = load_llama(tiny_llama).to(torch.bfloat16)
    assert max_logit_diff(dense, moe, token_ids) < 0.25  # bf16 rounding only; fp32 runs check 1e-5


def test_negative_perturbed_expert(tiny_llama, tmp_path, token_ids):
    out = convert(tiny_llama, tmp_path / "moe", UpcycleOptions(4, 2), progress=False).out_dir
    moe, dense = load_mixtral(out), load_llama(tiny_llama)
    assert max_logit_diff(dense, moe, token_ids) < ATOL
    with torch.no_grad():
        moe.model.layers[1].block_sparse_moe.experts[2].w2.weight.mul_(1.05)
    assert max_logit_diff(dense, moe, token_ids) > FAIL


def test_negative_swapped_gate_up(tiny_llama, tmp_path, token_ids):
    out = convert(tiny_llama, tmp_path / "moe", UpcycleOptions(2, 1), progress=False).out_dir
    moe = load_mixtral(out)
    with torch.no_grad():
        for ex in moe.model.layers[0].block_sparse_moe.experts:
            w1 = ex.w1.weight.clone()
            ex.w1.weight.copy_(ex.w3.weight)
            ex.w3.weight.copy_(w1)
    assert max_logit_diff(load_llama(tiny_llama), moe, token_ids) > FAIL


@pytest.mark.parametrize("scaling", ["none", "megatron"])
def test_negative_granular_without_exact_scaling(tiny_llama, tmp_path, token_ids, scaling):
    opts = UpcycleOptions(8, 2, granularity=2, scaling=scaling)
    assert not step0_report(opts)[0]
    out = convert(tiny_llama, tmp_path / "moe", opts, progress=False).out_dir
    assert max_logit_diff(load_llama(tiny_llama), load_mixtral(out), token_ids) > FAIL


def test_negative_topk_not_multiple_of_granularity(tiny_llama, tmp_path, token_ids):
    opts = UpcycleOptions(8, 2, granularity=4, scaling="exact")
    exact, why = step0_report(opts)
    assert not exact and "multiple of G" in why
    out = convert(tiny_llama, tmp_path / "moe", opts, progress=False).out_dir
    assert max_logit_diff(load_llama(tiny_llama), load_mixtral(out), token_ids) > FAIL


def test_pre_softmax_needs_renormalization(tiny_llama, tmp_path, token_ids):
    """softmax then top-k scales the output by the kept mass (< 1): the recorded routing must show it."""
    from nemo_upcycle.offline.verify import load_moe

    dense = load_llama(tiny_llama)
    raw = UpcycleOptions(8, 2, moe_router_pre_softmax=True, scaling="none")
    assert not step0_report(raw)[0]
    out = convert(tiny_llama, tmp_path / "raw", raw, progress=False).out_dir
    assert max_logit_diff(dense, load_moe(out), token_ids) > FAIL  # negative control
    renorm = UpcycleOptions(8, 2, moe_router_pre_softmax=True, norm_topk_prob=True)
    assert step0_report(renorm)[0]
    out = convert(tiny_llama, tmp_path / "renorm", renorm, progress=False).out_dir
    assert max_logit_diff(dense, load_moe(out), token_ids) < ATOL


def test_upcycling_record(tiny_llama, tmp_path):
    opts = UpcycleOptions(8, 2, granularity=2, moe_expert_capacity_factor=1.25, moe_token_drop_policy="position")
    cfg = convert(tiny_llama, tmp_path / "moe", opts, progress=False).config
    rec = cfg["upcycling"]
    assert cfg["intermediate_size"] == 22 and cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    assert rec["router_init"] == "virtual_group" and rec["scale_factor"] == 2.0
    assert rec["moe_expert_capacity_factor"] == 1.25 and rec["moe_token_drop_policy"] == "position"
    assert rec["moe_router_pre_softmax"] is False and rec["norm_topk_prob"] is True
    assert rec["step0_equivalent"] is True


def test_noise_and_drop_change_experts_differently(tiny_llama, tmp_path, token_ids):
    opts = UpcycleOptions(4, 2, drop_ratio=0.5, seed=7)
    out = convert(tiny_llama, tmp_path / "moe", opts, progress=False).out_dir
    moe = load_mixtral(out)
    ex = moe.model.layers[0].block_sparse_moe.experts
    dense_gate = load_llama(tiny_llama).model.layers[0].mlp.gate_proj.weight
    kept = [(ex[e].w1.weight == dense_gate).all(dim=1) for e in range(4)]
    assert all(k.sum().item() == 22 for k in kept), "r=0.5 of 44 units must be re-initialized in every expert"
    assert not torch.equal(kept[0], kept[1]), "each expert must drop its own units"
    assert max_logit_diff(load_llama(tiny_llama), moe, token_ids) > FAIL


def test_verify_cli_exit_codes(tiny_llama, tmp_path, capsys):
    from nemo_upcycle.apps.cli import main

    good, noisy = tmp_path / "good", tmp_path / "noisy"
    assert main(["convert", str(tiny_llama), str(good), "-E", "4", "-k", "2", "--no-progress"]) == 0
    assert main(["convert", str(tiny_llama), str(noisy), "-E", "4", "-k", "2", "--noise-std", "0.05",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "step-0 equivalent: no (expert noise" in out
    assert main(["verify", str(tiny_llama), str(good), "--atol", "1e-5"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["verify", str(tiny_llama), str(noisy), "--atol", "1e-5"]) == 1
    assert "FAIL" in capsys.readouterr().out
