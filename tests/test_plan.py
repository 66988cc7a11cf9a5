"""Plan mode (nemo_upcycle.planning.plan): layout rules, parameter counts, memory and FLOPs, no GPU and no NeMo.

References nobody here wrote: transformers' MixtralForCausalLM on the meta device (zero memory), the HF
converter's own key table (nemo_upcycle.formats.mixtral), closed forms typed out below from the papers, Megatron's
theoretical_memory_usage interleaving factor and NeMo's flops_formulas.mixtral; negative controls prove the
checks can fail. The CPU training memory estimate (``precheck.cpu_training_memory``) against peaks measured here.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from helpers import LAYOUT_8X8B_64_H100, LLAMA3_8X8B, TRAINING_8X8B
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.planning.flops import GPUS, flops_per_token
from nemo_upcycle.planning.layout import (
    GiB,
    ModelDims,
    ParallelLayout,
    TrainingSetup,
    check_layout,
    layout_problems,
)
from nemo_upcycle.planning.plan import (
    format_plan,
    in_flight_layers,
    layer_activation_bytes,
    layer_parameters,
    parameter_counts,
    plan,
    rank_parameters,
    stage_memory,
)

V, D, F, L, H, KV, HD, E, K = 128256, 4096, 14336, 32, 32, 8, 128, 8, 2


def meta_mixtral(**sizes):
    from transformers import MixtralConfig, MixtralForCausalLM

    with torch.device("meta"):
        return MixtralForCausalLM(MixtralConfig(**sizes))


def hf_sizes(m: ModelDims) -> dict:
    return dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.moe_ffn_hidden_size,
                num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.num_query_groups, head_dim=m.kv_channels, num_local_experts=m.num_moe_experts,
                num_experts_per_tok=m.moe_router_topk, tie_word_embeddings=m.share_embeddings_and_output_weights)


def layout(**changes) -> ParallelLayout:
    return dataclasses.replace(LAYOUT_8X8B_64_H100, **changes)


# ---- the 64 x H100 layout ------------------------------------------------------------------------------
def test_8x8b_layout_is_valid_and_fits_h100():
    # Mixtral 8x7B's published H100 layout (46.7B total / 12.9B active, 32 layers, like 8x8B's 47.5B / 13.7B):
    # TP1 keeps the 14336-wide experts whole, EP8 puts one expert per GPU, PP4 x VP8 = one layer per virtual
    # chunk (32 layers) to shrink the bubble, DP16 / expert DP 2; selective recompute.
    pl = plan(LLAMA3_8X8B, LAYOUT_8X8B_64_H100, TRAINING_8X8B, "H100")
    par = pl.parallel
    assert (par.world_size, par.data_parallel_size, par.expert_data_parallel_size) == (64, 16, 2)
    assert pl.warnings == [] and pl.fits
    assert pl.peak["stage"] == 0 and pl.peak["in_flight_layers"] == 35
    assert 50 * GiB < pl.peak["total"] < 70 * GiB, pl.peak["total"] / GiB  # ~59.6 GiB
    assert plan(LLAMA3_8X8B, LAYOUT_8X8B_64_H100, TRAINING_8X8B, "H200").fits
    text = format_plan(pl)
    assert "FITS" in text and "TP1 PP4 VP8 CP1 EP8 ETP1" in text and "tokens/s/GPU" in text


def test_other_valid_layouts_pass():
    ok = [layout(tensor_model_parallel_size=2, virtual_pipeline_model_parallel_size=4, sequence_parallel=True,
                 expert_tensor_parallel_size=1),
          layout(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=None, context_parallel_size=2),
          layout(num_nodes=16, tensor_model_parallel_size=2, expert_tensor_parallel_size=2, sequence_parallel=True)]
    for par in ok:
        assert [p for p in layout_problems(LLAMA3_8X8B, par, TRAINING_8X8B) if p.level == "error"] == [], par
    assert [(p.data_parallel_size, p.expert_data_parallel_size) for p in ok] == [(8, 2), (16, 4), (16, 2)]
    assert layout(tensor_model_parallel_size=2).etp == 2 and ok[0].etp == 1  # ETP None follows TP, after replace too


# ---- bad layouts ----------------------------------------------------------------------------------------
BAD = {
    "EP does not divide E": (dict(expert_model_parallel_size=3), {}, "num_moe_experts"),
    "TP does not divide heads": (dict(tensor_model_parallel_size=3), {}, "num_attention_heads"),
    "TP does not divide query groups": (dict(tensor_model_parallel_size=16, expert_tensor_parallel_size=1), {},
                                        "num_query_groups"),
    "world size not divisible": (dict(num_nodes=1, gpus_per_node=6), {}, "gpus_per_node"),
    "layers % (PP*VP)": (dict(virtual_pipeline_model_parallel_size=3), {}, "num_layers"),
    "VP without PP": (dict(pipeline_model_parallel_size=1), {}, "virtual_pipeline_model_parallel_size"),
    "global batch not divisible": ({}, dict(global_batch_size=100), "global_batch_size"),
    "interleaving micro-batches % PP": ({}, dict(global_batch_size=96), "virtual_pipeline_model_parallel_size"),
    "expert folding": (dict(num_nodes=4, expert_tensor_parallel_size=2), {}, "expert_tensor_parallel_size"),
    "CP chunks": (dict(context_parallel_size=2), dict(seq_length=4094), "context_parallel_size"),
    "SP without TP": (dict(sequence_parallel=True), {}, "sequence_parallel"),
    "unknown recompute": ({}, dict(recompute="some"), "recompute"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_layout_names_the_key(name):
    par_changes, tr_changes, key = BAD[name]
    par, tr = layout(**par_changes), dataclasses.replace(TRAINING_8X8B, **tr_changes)
    errors = [p for p in layout_problems(LLAMA3_8X8B, par, tr) if p.level == "error"]
    assert any(key in p.keys and key in p.message for p in errors), errors
    with pytest.raises(UpcycleError) as info:
        check_layout(LLAMA3_8X8B, par, tr)
    msg = str(info.value)
    assert key in msg and "\n" not in msg, msg
    with pytest.raises(UpcycleError):
        plan(LLAMA3_8X8B, par, tr)


def test_fix_suggestions_and_warnings():
    errors = layout_problems(LLAMA3_8X8B, layout(expert_model_parallel_size=3), TRAINING_8X8B)
    assert any("[1, 2, 4, 8]" in p.message for p in errors)  # the EP values that would work
    tp2 = layout(tensor_model_parallel_size=2, virtual_pipeline_model_parallel_size=4)
    with pytest.raises(UpcycleError, match="need sequence_parallel=true"):  # MoE + TP: Megatron refuses it
        check_layout(LLAMA3_8X8B, tp2, TRAINING_8X8B)
    dense = dataclasses.replace(LLAMA3_8X8B, num_moe_experts=None)  # a dense model (EP 1) only gets the warning
    tp2 = dataclasses.replace(tp2, expert_model_parallel_size=1)
    assert check_layout(dense, tp2, TRAINING_8X8B) and "sequence_parallel" in check_layout(dense, tp2, TRAINING_8X8B)[0]
    assert check_layout(LLAMA3_8X8B, dataclasses.replace(tp2, sequence_parallel=True), TRAINING_8X8B) == []
    assert check_layout(LLAMA3_8X8B, LAYOUT_8X8B_64_H100, TRAINING_8X8B) == []


# ---- parameter counts ----------------------------------------------------------------------------------
def test_parameter_counts_8x8b_closed_form_converter_and_transformers():
    attn = D * H * HD * 2 + D * KV * HD * 2  # q, o + k, v
    per_layer_shared = attn + 2 * D + E * D  # attention, two norms, router
    total = 2 * V * D + D + L * (per_layer_shared + E * 3 * D * F)
    active = 2 * V * D + D + L * (per_layer_shared + K * 3 * D * F)
    counts = parameter_counts(LLAMA3_8X8B)
    assert (counts["total"], counts["active"]) == (total, active)
    # the dense 8.0B plus 7 more copies of its 32 MLPs (3 x 4096 x 14336 each); active: one more copy
    assert round(total / 1e9, 1) == 47.5 and round(active / 1e9, 1) == 13.7

    from nemo_upcycle.core import UpcycleOptions
    from nemo_upcycle.formats.mixtral import parameter_counts as hf_counts

    llama = {"hidden_size": D, "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H,
             "num_key_value_heads": KV, "vocab_size": V, "tie_word_embeddings": False}
    assert hf_counts(llama, UpcycleOptions(num_moe_experts=E, moe_router_topk=K)) == {"total": total, "active": active}

    model = meta_mixtral(**hf_sizes(LLAMA3_8X8B))
    named = dict(model.named_parameters())
    assert sum(p.numel() for p in named.values()) == total
    layer0 = {n: p.numel() for n, p in named.items() if n.startswith("model.layers.0.")}
    experts0 = sum(n for k, n in layer0.items() if ".experts." in k)
    lp = layer_parameters(LLAMA3_8X8B, moe=True)
    assert experts0 == lp["experts"] == E * 3 * D * F
    assert sum(layer0.values()) == sum(lp.values())
    per_expert = sum(n for k, n in layer0.items() if ".experts.0." in k)
    assert total - L * (E - K) * per_expert == active


def test_parameter_counts_tiny_tied_odd_sizes_against_transformers():
    m = ModelDims(num_layers=3, hidden_size=36, ffn_hidden_size=44, num_attention_heads=6, vocab_size=99,
                  num_query_groups=2, kv_channels=6, share_embeddings_and_output_weights=True, num_moe_experts=4,
                  moe_router_topk=2)
    model = meta_mixtral(**hf_sizes(m))
    assert parameter_counts(m)["total"] == sum(p.numel() for p in model.parameters())  # tied counted once
    negative = dataclasses.replace(m, share_embeddings_and_output_weights=False)
    assert parameter_counts(negative)["total"] != sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("par,model", [
    (LAYOUT_8X8B_64_H100, LLAMA3_8X8B),
    (layout(tensor_model_parallel_size=2, virtual_pipeline_model_parallel_size=4, sequence_parallel=True,
            expert_tensor_parallel_size=1), LLAMA3_8X8B),
    (layout(num_nodes=16, tensor_model_parallel_size=2, expert_tensor_parallel_size=2, sequence_parallel=True),
     LLAMA3_8X8B),
    (ParallelLayout(num_nodes=1, gpus_per_node=8, tensor_model_parallel_size=4, pipeline_model_parallel_size=2,
                    expert_model_parallel_size=2, sequence_parallel=True),
     dataclasses.replace(LLAMA3_8X8B, vocab_size=128000, share_embeddings_and_output_weights=True,
                         moe_layer_freq=[1, 0] * 16)),
])
def test_per_rank_counts_sum_back_to_total(par, model):
    t, p = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    stages = rank_parameters(model, par)
    # every stage has TP ranks each holding its shard of the sharded part and a full copy of the replicated part;
    # the experts of a stage are spread over EP*ETP ranks
    summed = sum(s["sharded"] * t + s["replicated"]
                 + s["expert"] * par.expert_model_parallel_size * par.etp for s in stages)
    counts = parameter_counts(model, tp=t)  # Megatron pads the vocab to a multiple of 128*TP
    tied_copy = counts["embedding"] if model.share_embeddings_and_output_weights and p > 1 else 0
    assert summed == counts["total"] + tied_copy
    assert sorted(i for s in stages for i in s["layers"]) == list(range(model.num_layers))


def test_rank_counts_8x8b_by_hand():
    stages = rank_parameters(LLAMA3_8X8B, LAYOUT_8X8B_64_H100)
    layer_dense = D * HD * (2 * H + 2 * KV) + 2 * D + E * D
    assert stages[0]["dense"] == V * D + 8 * layer_dense
    assert stages[1]["dense"] == 8 * layer_dense
    assert stages[3]["dense"] == V * D + 8 * layer_dense + D  # output layer + final norm
    assert all(s["expert"] == 8 * 3 * D * F for s in stages)  # 8 layers x one expert each (EP8)
    assert stages[0]["layers"] == list(range(0, 32, 4)) and stages[3]["layers"] == list(range(3, 32, 4))


# ---- memory ---------------------------------------------------------------------------------------------
TINY = ModelDims(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=256,
                 num_query_groups=2, kv_channels=16, num_moe_experts=4, moe_router_topk=2)
TINY_PAR = ParallelLayout(num_nodes=1, gpus_per_node=4, pipeline_model_parallel_size=2, expert_model_parallel_size=2)
TINY_TR = TrainingSetup(seq_length=32, micro_batch_size=1, global_batch_size=4, recompute="selective",
                        overhead_bytes=0)


def test_memory_tiny_by_hand():
    # DP 2, expert DP 4/(2*1*2) = 1, 2 micro-batches; stage 0 = layers 0, 1 + embedding; stage 1 = 2, 3 + output
    attn, rep, experts = 64 * 64 * 2 + 64 * 32 * 2, 2 * 64 + 4 * 64, 4 * 3 * 64 * 128
    dense0, dense1, expert = 2 * attn + 256 * 64 + 2 * rep, 2 * attn + 256 * 64 + 2 * rep + 64, 2 * experts // 2
    sbh = 32 * 64
    layer = sbh * 34 - sbh * 19 + 2 * sbh * (3 + 16 * 128 / (4 * 64) * 1.5)  # 15 + k * (3 + 12) = 45 sbh
    assert layer == 45 * sbh
    want = [
        dict(weights=2 * (dense0 + expert), gradients=4 * (dense0 + expert), optimizer=12 * dense0 // 2 + 12 * expert,
             activations=2 * 2 * layer, in_flight_layers=4),  # 1F1B: stage 0 holds PP = 2 micro-batches
        dict(weights=2 * (dense1 + expert), gradients=4 * (dense1 + expert), optimizer=12 * dense1 // 2 + 12 * expert,
             activations=1 * 2 * layer + 4 * 32 * (64 + 256), in_flight_layers=2),  # + fp32 logits
    ]
    got = [stage_memory(TINY, TINY_PAR, TINY_TR, s) for s in rank_parameters(TINY, TINY_PAR)]
    for g, w in zip(got, want):
        assert {k: g[k] for k in w} == w
        assert g["total"] == w["weights"] + w["gradients"] + w["optimizer"] + w["activations"]
    assert got[0]["total"] == 2638848

    # negative controls: the replicated optimizer and full recompute change the numbers the way they should
    rep_opt = stage_memory(TINY, TINY_PAR, dataclasses.replace(TINY_TR, use_distributed_optimizer=False),
                           rank_parameters(TINY, TINY_PAR)[0])
    assert rep_opt["optimizer"] == 12 * (dense0 + expert) != want[0]["optimizer"]
    full = stage_memory(TINY, TINY_PAR, dataclasses.replace(TINY_TR, recompute="full"),
                        rank_parameters(TINY, TINY_PAR)[0])
    assert full["activations"] == 4 * 2 * sbh + layer < want[0]["activations"]


def test_activation_options_by_hand():
    sbh = 32 * 64
    moe = layer_activation_bytes(TINY, TINY_PAR, TINY_TR, True)
    dense = layer_activation_bytes(TINY, TINY_PAR, TINY_TR, False)
    assert (moe, dense) == (45 * sbh, 15 * sbh + 3 * sbh + 4 * 128 / 64 * 1.5 * sbh)  # k = 2 copies of the MLP part
    capped = dataclasses.replace(TINY, moe_expert_capacity_factor=1.25)
    assert layer_activation_bytes(capped, TINY_PAR, TINY_TR, True) == 15 * sbh + 1.25 * 30 * sbh
    unfused = dataclasses.replace(TINY_TR, recompute="none", flash_attention=False)
    assert layer_activation_bytes(TINY, TINY_PAR, unfused, True) == 45 * sbh + 5 * 4 * 32 * 32  # + 5 a s^2 b
    assert layer_activation_bytes(TINY, TINY_PAR, dataclasses.replace(unfused, flash_attention=True), True) == moe


@pytest.mark.parametrize("sp", [True, False])
def test_memory_tiny_tp_cp_by_hand(sp):
    # TP2, CP2, EP2 (ETP1) on 8 GPUs: DP 8/(2*2) = 2, expert DP 8/2 = 4, one PP stage
    par = ParallelLayout(num_nodes=1, gpus_per_node=8, tensor_model_parallel_size=2, context_parallel_size=2,
                         expert_model_parallel_size=2, expert_tensor_parallel_size=1, sequence_parallel=sp)
    assert (par.data_parallel_size, par.expert_data_parallel_size) == (2, 4)
    if sp:
        assert check_layout(TINY, par, TINY_TR) == []
    else:  # MoE with TP and no sequence parallelism: Megatron refuses it (the memory formula still covers it)
        with pytest.raises(UpcycleError, match="need sequence_parallel=true"):
            check_layout(TINY, par, TINY_TR)
    tsp = 2 if sp else 1  # sequence parallel also shards the 10 sbh Korthikanti keeps replicated over TP
    attn, rep, experts = 64 * 64 * 2 + 64 * 32 * 2, 2 * 64 + 4 * 64, 4 * 3 * 64 * 128
    dense = (4 * attn + 2 * 256 * 64) // 2 + 4 * rep + 64  # attention, embedding, output / TP; norms, routers
    expert = 4 * experts // 2
    sbh = 32 // 2 * 64  # CP halves the sequence
    layer = sbh * (7 / tsp + 8 / 2) + 2 * sbh * (3 / tsp + 12 / 1)  # expert intermediates / ETP (1), not TP
    (sp,) = rank_parameters(TINY, par)
    assert (sp["dense"], sp["expert"]) == (dense, expert)
    got = stage_memory(TINY, par, TINY_TR, sp)
    assert got["optimizer"] == 12 * dense // (2 * 2) + 12 * expert // 4  # dense sharded over DP x CP
    assert got["activations"] == 4 * layer + 4 * (32 // 2) * (64 / tsp + 256 / 2)  # 4 layers, 1 micro-batch, logits


def test_in_flight_layers_match_megatron_factors():
    # Megatron theoretical_memory_usage: the first stage holds L layers' worth without interleaving and
    # L * (1 + (p - 1) / (p v)) with it
    for p, v in [(4, 8), (4, 2), (2, 4), (8, 4)]:
        par = ParallelLayout(num_nodes=8, pipeline_model_parallel_size=p, virtual_pipeline_model_parallel_size=v)
        assert in_flight_layers(32, par, 64, 0) == 32 * (1 + (p - 1) / (p * v))
    par = ParallelLayout(num_nodes=8, pipeline_model_parallel_size=4)
    assert [in_flight_layers(32, par, 64, r) for r in range(4)] == [32, 24, 16, 8]
    assert in_flight_layers(32, par, 2, 0) == 16  # fewer micro-batches than stages


def test_does_not_fit_negative_controls():
    a100_40 = plan(LLAMA3_8X8B, LAYOUT_8X8B_64_H100, TRAINING_8X8B, GPUS["A100-40GB"])
    assert not a100_40.fits and "DOES NOT FIT" in format_plan(a100_40)
    unfused = dataclasses.replace(TRAINING_8X8B, recompute="none", flash_attention=False)  # s x s scores kept
    assert not plan(LLAMA3_8X8B, LAYOUT_8X8B_64_H100, unfused).fits
    one_node = ParallelLayout(num_nodes=1, gpus_per_node=8, expert_model_parallel_size=8)
    assert not plan(LLAMA3_8X8B, one_node, dataclasses.replace(TRAINING_8X8B, recompute="full")).fits
    full = plan(LLAMA3_8X8B, LAYOUT_8X8B_64_H100, dataclasses.replace(TRAINING_8X8B, recompute="full"))
    assert full.fits and full.peak["activations"] < plan(LLAMA3_8X8B, LAYOUT_8X8B_64_H100, TRAINING_8X8B).peak[
        "activations"]


# ---- FLOPs ----------------------------------------------------------------------------------------------
def test_flops_per_token_by_hand():
    s = 4096
    active_matmul = L * (D * HD * (2 * H + 2 * KV) + K * 3 * D * F) + V * D  # + output layer, no embedding
    by_6n = 6 * active_matmul + 6 * L * s * H * HD  # causal attention: half of 12 L s (a d)
    nemo_mixtral = L * D * D * (12 + 12 * KV / H + 18 * K * F / D + 6 * s / D + 6 * V / (L * D))
    got = flops_per_token(LLAMA3_8X8B, s, tp=1)
    assert got == by_6n
    assert abs(got - nemo_mixtral) / got < 1e-12
    pl = plan(LLAMA3_8X8B, LAYOUT_8X8B_64_H100, TRAINING_8X8B)
    assert pl.tokens_per_s_per_gpu == pytest.approx(0.468 * 989e12 / by_6n)  # ~5640
    assert pl.step_seconds == pytest.approx(256 * 4096 / (pl.tokens_per_s_per_gpu * 64))
    assert flops_per_token(dataclasses.replace(LLAMA3_8X8B, moe_router_topk=1), s) < got  # negative control


def test_plan_module_imports_no_nemo_or_megatron():
    code = ("import sys, nemo_upcycle.planning.plan; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('nemo', 'megatron', 'torch')]; assert not bad, bad[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- CPU training memory (precheck.cpu_training_memory: train.py refuses a CPU run larger than the machine) ----
# Measured peak RSS on this machine (2 cores; /usr/bin/time's maximum resident set size in KiB): the embedded default
# (README: 18.6 GB, read as 18.6e6 KiB), the tiny recipe, tiny with 2048-token windows (attention scores dominate)
# and a 155M-parameter E8 tiny-family model with a checkpoint every step (weights, gradients and Adam dominate).
TINY_RECIPE = "tiny_llama_upcycle"
BIGGER_TINY = ["model.hidden_size=512", "model.ffn_hidden_size=2048", "model.num_layers=6",
               "model.num_attention_heads=8", "model.num_query_groups=2", "model.kv_channels=64", "moe=e8_top2",
               "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1", "trainer.val_check_interval=1"]
MEASURED = {  # case -> (recipe, overrides, peak RSS in KiB)
    "smollm2 default": ("smollm2_135m_upcycle", [], 18.6e6),
    "tiny": (TINY_RECIPE, [], 850_632),
    "tiny seq 2048": (TINY_RECIPE, ["model.seq_length=2048", "data.seq_length=2048", "trainer.max_steps=2"], 2_198_900),
    "tiny 155M E8": (TINY_RECIPE, BIGGER_TINY, 4_639_356),
}


def _estimate(run):
    from nemo_upcycle.apps.precheck import cpu_training_memory
    from nemo_upcycle.config.translate import model_dims, parallel_layout, training_setup

    return cpu_training_memory(model_dims(run), parallel_layout(run), training_setup(run),
                               checkpoints=run.trainer.checkpoint_every_n_steps > 0, mock_data=run.data.kind == "mock")


@pytest.mark.parametrize("case", list(MEASURED))
def test_cpu_memory_estimate_is_within_ten_percent_of_the_measured_peak(case):
    from nemo_upcycle.config.compose import compose

    recipe, overrides, kib = MEASURED[case]
    est = _estimate(compose(recipe, overrides))["total"]
    assert 0.9 < est / (kib * 1024) < 1.1, (case, est / 1e9, kib * 1024 / 1e9)


def test_cpu_run_larger_than_the_machine_is_refused(monkeypatch):
    import nemo_upcycle.apps.precheck as pc
    from nemo_upcycle.apps.precheck import check_memory
    from nemo_upcycle.config.compose import compose

    monkeypatch.setattr(pc, "machine_memory", lambda: 24 * 10**9)  # this machine: 24 GB
    assert check_memory(compose("smollm2_135m_upcycle"))["total"] < 20e9  # the embedded default runs
    check_memory(compose(TINY_RECIPE))
    with pytest.raises(UpcycleError, match=r"needs about 2725.\d GiB of memory .*activations 2724.\d GiB.* this "
                                           r"machine has 22.4 GiB; lower data.seq_length or data.micro_batch_size"):
        check_memory(compose(TINY_RECIPE, ["model.seq_length=100000", "data.seq_length=100000"]))
    monkeypatch.setattr(pc, "machine_memory", lambda: 16 * 2**30)  # a 16 GiB laptop cannot hold the default
    with pytest.raises(UpcycleError, match=r"needs about 17.5 GiB .* has 16.0 GiB; use fewer experts"):
        check_memory(compose("smollm2_135m_upcycle"))
    # two processes on one node (torchrun, EP 2) each hold their half of the experts: counted per process, twice
    two = check_memory(compose(TINY_RECIPE, ["parallel=cpu_2_ep2"]))
    assert two["parameters"] < _estimate(compose(TINY_RECIPE))["parameters"]
