"""Shared experts and mixed dense / MoE stacks, converted offline to HF Qwen2-MoE and run by transformers' own
``Qwen2MoeForCausalLM`` against transformers' ``LlamaForCausalLM`` (the dense model) in fp32 on tiny random models of
odd sizes. Every function-preserving setting agrees within 1e-5; each negative control shows the check failing.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import load_llama, make_llama, max_logit_diff
from nemo_upcycle.apps.cli import main
from nemo_upcycle.core import UpcycleOptions, expert_weights, route, router_weight, step0_report
from nemo_upcycle.core.shared import shared_expert_weights
from nemo_upcycle.errors import FieldError, UpcycleError
from nemo_upcycle.offline.convert import convert
from nemo_upcycle.offline.verify import load_moe

ATOL = 1e-5
FAIL = 1e-3

# (E, k, G, S, gate): whole copies and shards, S below / equal to / above G, with and without Megatron's gate
SHARED = [(4, 2, 1, 1, False), (4, 2, 1, 1, True), (4, 1, 1, 2, False), (8, 2, 2, 1, True), (8, 2, 2, 2, False),
          (8, 4, 4, 3, True), (8, 4, 4, 5, False), (4, 2, 2, 4, True)]


def _mlp(gate, up, down, x):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@pytest.mark.parametrize("E,k,G,S,gate", SHARED, ids=[f"E{E}k{k}G{G}S{S}{'g' * g}" for E, k, G, S, g in SHARED])
def test_core_shared_plus_routed_is_dense(E, k, G, S, gate):
    """Megatron's MoE layer on plain tensors (routed experts by ``route`` + shared MLP x sigmoid(0) when gated) against
    the dense SwiGLU MLP; negative control: the same shared expert added to experts built without it."""
    g = torch.Generator().manual_seed(E * 100 + S)
    D, Fd = 12, 20
    gate_FD, up_FD, down_DF = (torch.randn(s, generator=g) for s in ((Fd, D), (Fd, D), (D, Fd)))
    x = torch.randn(17, D, generator=g)
    opts = UpcycleOptions(E, k, granularity=G, shared_experts=S, moe_shared_expert_gate=gate).validate(Fd)
    assert step0_report(opts)[0], step0_report(opts)
    probs, idx = route(x @ router_weight(D, opts, 0).T, k)
    routed = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        w = expert_weights(gate_FD, up_FD, down_DF, opts, 0, e)
        routed.index_add_(0, tok, _mlp(*w, x[tok]) * probs[tok, slot, None])
    sh = _mlp(*shared_expert_weights(gate_FD, up_FD, down_DF, opts), x) * (torch.sigmoid(torch.zeros(1)) if gate else 1)
    dense = _mlp(gate_FD, up_FD, down_DF, x)
    assert (routed + sh - dense).abs().max() < 1e-4
    plain = UpcycleOptions(E, k, granularity=G)
    routed_plain = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        routed_plain.index_add_(0, tok, _mlp(*expert_weights(gate_FD, up_FD, down_DF, plain, 0, e), x[tok])
                                * probs[tok, slot, None])
    assert (routed_plain + sh - dense).abs().max() > FAIL


@pytest.mark.parametrize("E,k,G,S,gate", SHARED[:6], ids=[f"E{E}k{k}G{G}S{S}{'g' if g else ''}"
                                                          for E, k, G, S, g in SHARED[:6]])
def test_qwen2_moe_with_shared_experts(tiny_llama, tmp_path, token_ids, E, k, G, S, gate):
    opts = UpcycleOptions(E, k, granularity=G, shared_experts=S, moe_shared_expert_gate=gate)
    res = convert(tiny_llama, tmp_path / "moe", opts, progress=False)
    cfg = res.config
    assert cfg["model_type"] == "qwen2_moe" and cfg["shared_expert_intermediate_size"] == S * 44 // G
    assert cfg["upcycling"]["step0_equivalent"] is True
    moe = load_moe(res.out_dir)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert max_logit_diff(load_llama(tiny_llama), moe, token_ids) < ATOL


@pytest.mark.parametrize("layers,S", [("every:2", 0), ("1", 1), ("0,2", 2)])
def test_mixed_dense_and_moe_layers(tiny_llama, tmp_path, token_ids, layers, S):
    res = convert(tiny_llama, tmp_path / "moe", UpcycleOptions(4, 2, moe_layers=layers, shared_experts=S),
                  progress=False)
    dense_layers = {"every:2": [1], "1": [0, 2], "0,2": [1]}[layers]
    assert res.config["mlp_only_layers"] == dense_layers
    moe = load_moe(res.out_dir)
    for i, layer in enumerate(moe.model.layers):
        assert (type(layer.mlp).__name__ == "Qwen2MoeMLP") == (i in dense_layers)
    dense = load_llama(tiny_llama)
    assert max_logit_diff(dense, moe, token_ids) < ATOL
    # negative control: a dense layer's MLP perturbed
    with torch.no_grad():
        moe.model.layers[dense_layers[0]].mlp.down_proj.weight.mul_(1.05)
    assert max_logit_diff(dense, moe, token_ids) > FAIL


def test_negative_controls_shared_expert(tiny_llama, tmp_path, token_ids):
    out = convert(tiny_llama, tmp_path / "moe", UpcycleOptions(4, 2, shared_experts=1), progress=False).out_dir
    dense = load_llama(tiny_llama)
    moe = load_moe(out)
    assert max_logit_diff(dense, moe, token_ids) < ATOL
    block = moe.model.layers[1].mlp
    with torch.no_grad():
        block.shared_expert_gate.weight.normal_(0, 0.5)  # the gate no longer 1/2
    assert max_logit_diff(dense, moe, token_ids) > FAIL
    moe = load_moe(out)
    with torch.no_grad():
        moe.model.layers[0].mlp.shared_expert.down_proj.weight.mul_(2.0)  # shared expert at full weight
    assert max_logit_diff(dense, moe, token_ids) > FAIL


def test_format_choice(tiny_llama, tmp_path, token_ids):
    """auto: Mixtral when it holds the model; qwen2_moe on request for the same model; a refusal otherwise."""
    assert convert(tiny_llama, tmp_path / "a", UpcycleOptions(4, 2), progress=False).config["model_type"] == "mixtral"
    q = convert(tiny_llama, tmp_path / "q", UpcycleOptions(4, 2), progress=False, fmt="qwen2_moe")
    assert q.config["model_type"] == "qwen2_moe" and q.config["shared_expert_intermediate_size"] == 0
    assert max_logit_diff(load_llama(tiny_llama), load_moe(q.out_dir), token_ids) < ATOL
    for opts in (UpcycleOptions(4, 2, shared_experts=1), UpcycleOptions(4, 2, moe_layers="every:2")):
        with pytest.raises(UpcycleError, match="--format mixtral cannot hold this model.*use --format qwen2_moe"):
            convert(tiny_llama, tmp_path / "m", opts, progress=False, fmt="mixtral")
        assert not (tmp_path / "m").exists()


def test_pre_softmax_held_natively(tiny_llama, tmp_path, token_ids):
    """softmax then top-k without renormalisation is Qwen2-MoE's own routing (norm_topk_prob false): no replay."""
    opts = UpcycleOptions(4, 2, moe_router_pre_softmax=True, norm_topk_prob=False, scaling="none", shared_experts=1)
    res = convert(tiny_llama, tmp_path / "moe", opts, progress=False)
    assert res.config["norm_topk_prob"] is False and not step0_report(opts)[0]
    from transformers import Qwen2MoeForCausalLM

    native = Qwen2MoeForCausalLM.from_pretrained(res.out_dir, dtype=torch.float32)
    replayed = load_moe(res.out_dir)
    assert max_logit_diff(native, replayed, token_ids) == 0.0
    assert max_logit_diff(load_llama(tiny_llama), native, token_ids) > FAIL  # the kept mass < 1 shows


def test_config_keys_transformers_5(tiny_llama, tmp_path):
    """The keys transformers 5.x's Qwen2MoeConfig declares (configuration_qwen2_moe.py on main), with their types,
    written in the legacy form 4.57 reads (rope_theta top-level, converted by 5.x)."""
    opts = UpcycleOptions(8, 2, granularity=2, shared_experts=2, moe_layers="every:2")
    cfg = convert(tiny_llama, tmp_path / "moe", opts, progress=False).config
    ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "max_window_layers", "decoder_sparse_step",
            "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok", "num_experts")
    bools = ("use_cache", "tie_word_embeddings", "use_sliding_window", "norm_topk_prob", "output_router_logits",
             "qkv_bias")
    for k in ints:
        assert isinstance(cfg[k], int) and not isinstance(cfg[k], bool), k
    for k in bools:
        assert isinstance(cfg[k], bool), k
    assert cfg["mlp_only_layers"] == [1] and cfg["layer_types"] == ["full_attention"] * 3
    assert cfg["decoder_sparse_step"] == 1 and cfg["qkv_bias"] is False and cfg["rope_theta"] == 500000.0
    assert cfg["moe_intermediate_size"] == 22 and cfg["shared_expert_intermediate_size"] == 44
    assert cfg["upcycling"]["moe_shared_expert_intermediate_size"] == 44


def test_cli_convert_and_verify(tiny_llama, tmp_path, capsys):
    out, noisy = tmp_path / "moe", tmp_path / "noisy"
    assert main(["convert", str(tiny_llama), str(out), "-E", "4", "-k", "2", "--shared-experts", "1",
                 "--shared-expert-gate", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Qwen2MoeForCausalLM" in printed and "shared=1+gate" in printed
    assert "step-0 equivalent: yes" in printed and "zero-initialised sigmoid gate" in printed
    assert main(["verify", str(tiny_llama), str(out), "--atol", "1e-5"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["convert", str(tiny_llama), str(noisy), "-E", "4", "-k", "2", "--shared-experts", "1",
                 "--noise-std", "0.05", "--no-progress"]) == 0
    assert "step-0 equivalent: no" in capsys.readouterr().out
    assert main(["verify", str(tiny_llama), str(noisy), "--atol", "1e-5"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("extra,match,fixed", [
    (("--shared-expert-gate",), "--shared-expert-gate needs shared experts (--shared-experts = 0)",
     ("--shared-expert-gate", "--shared-experts", "1")),
    (("--shared-experts=-1",), "--shared-experts -1 must be a whole number >= 0", ("--shared-experts=1",)),
    (("--shared-experts", "1", "--format", "mixtral"), "--format mixtral cannot hold this model: HF Mixtral has no "
                                                       "shared expert; use --format qwen2_moe",
     ("--shared-experts", "1", "--format", "qwen2_moe")),
    (("--moe-layers", "every:2", "--format", "mixtral"), "HF Mixtral has no dense layers",
     ("--moe-layers", "every:2", "--format", "auto")),
])
def test_refusals(tiny_llama, tmp_path, capsys, extra, match, fixed):
    """One line, exit 2, nothing written; the accepted neighbour (the flags made consistent) converts."""
    before = sorted(tmp_path.iterdir())
    code = main(["convert", str(tiny_llama), str(tmp_path / "moe"), "-E", "4", "-k", "2", "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert sorted(tmp_path.iterdir()) == before
    assert main(["convert", str(tiny_llama), str(tmp_path / "ok"), "-E", "4", "-k", "2", "--no-progress", *fixed]) == 0


def test_shared_size_must_divide():
    from nemo_upcycle.core.shared import shared_from_size

    assert shared_from_size(66, 44, 2) == 3 and shared_from_size(None, 44, 2) == 0
    with pytest.raises(FieldError, match="not a multiple of the routed expert size 22"):
        shared_from_size(30, 44, 2)


def test_qwen2_moe_tied_and_record(tmp_path, token_ids):
    dense = make_llama(tmp_path / "dense", seed=5, tied=True, intermediate_size=30)
    res = convert(dense, tmp_path / "moe", UpcycleOptions(6, 3, granularity=3, shared_experts=2), progress=False)
    assert res.config["tie_word_embeddings"] is True
    assert json.loads((res.out_dir / "config.json").read_text())["upcycling"]["shared_experts"] == 2
    assert max_logit_diff(load_llama(dense), load_moe(res.out_dir), token_ids) < ATOL


@pytest.mark.parametrize("tied,G,S,layers", [(False, 1, 0, "all"), (True, 2, 3, "every:2"), (False, 4, 1, "2")])
def test_closed_form_sizes_equal_layout(tiny_llama, tied, G, S, layers):
    from nemo_upcycle.formats.qwen2_moe import layout, num_output_tensors, output_bytes

    cfg = {**json.loads((tiny_llama / "config.json").read_text()), "tie_word_embeddings": tied}
    opts = UpcycleOptions(8, 4, granularity=G, shared_experts=S, moe_layers=layers)
    plan = layout(cfg, opts, torch.bfloat16)
    assert num_output_tensors(cfg, opts) == len(plan)
    assert output_bytes(cfg, opts, torch.bfloat16) == sum(s.nbytes for s, _ in plan)
