"""Shared experts online: a Megatron-core MoE with ``SharedExpertMLP`` (with and without Megatron's sigmoid gate, set
through our spec), built by NeMo from ``UpcycledLlamaConfig`` and filled from the dense checkpoint, computes
transformers' dense ``LlamaForCausalLM`` logits (fp32, CPU, within 1e-5); the step-0 check passes on it and fails on
a perturbed shared expert. The filler's shared-expert shards at TP=2 reassemble into the single-rank tensors.
"""

from __future__ import annotations

import pytest
import torch

from helpers import build_moe as build
from helpers import load_llama

pytestmark = pytest.mark.slow  # imports NeMo (~25 s)


CASES = [dict(num_moe_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=44),
         dict(num_moe_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=44,
              moe_shared_expert_gate=True),
         dict(num_moe_experts=8, moe_router_topk=4, upcycle_granularity=4, moe_shared_expert_intermediate_size=33,
              moe_shared_expert_gate=True),
         dict(num_moe_experts=4, moe_router_topk=2, moe_layer_freq=[1, 0, 1], moe_shared_expert_intermediate_size=88)]


@pytest.mark.parametrize("moe", CASES, ids=["S1", "S1-gate", "G4-S3-gate", "mixed-S2"])
def test_step0_with_shared_experts(megatron_world, tiny_llama, token_ids, moe):
    from nemo_upcycle.engine.model import megatron_forward_logits, upcycle_into
    from nemo_upcycle.engine.step0 import run_checks, summarize

    src, cfg, module = build(tiny_llama, **moe)
    shared = [m.mlp.shared_experts for m in module.decoder.layers if hasattr(m.mlp, "shared_experts")]
    assert len(shared) == (2 if "moe_layer_freq" in moe else 3)
    assert all((s.gate_weight is not None) == moe.get("moe_shared_expert_gate", False) for s in shared)
    upcycle_into(module, cfg, src, progress=False)
    ref = load_llama(tiny_llama)(token_ids).logits
    diff = (megatron_forward_logits(module, token_ids) - ref).abs().max().item()
    assert diff < 1e-5, f"{moe}: max |dlogit| {diff:.2e}"
    opts = cfg.upcycle_options()
    assert summarize(run_checks([module], opts, str(tiny_llama)), opts)["passed"]
    with torch.no_grad():  # negative control: the shared expert at full weight
        shared[-1].linear_fc2.weight.mul_(2.0)
    assert (megatron_forward_logits(module, token_ids) - ref).abs().max().item() > 1e-3
    assert not summarize(run_checks([module], opts, str(tiny_llama)), opts)["passed"]


def test_shared_size_refused(megatron_world, tiny_llama):
    from nemo_upcycle.errors import UpcycleError

    src, cfg, _ = build(tiny_llama, num_moe_experts=4, moe_router_topk=2, upcycle_granularity=2,
                        moe_shared_expert_intermediate_size=30)
    with pytest.raises(UpcycleError, match="not a multiple of the routed expert size 22"):
        cfg.upcycle_options()


def test_filler_shared_shards_reassemble(tiny_llama):
    from nemo_upcycle.core import UpcycleOptions
    from nemo_upcycle.engine.filler import MegatronFiller, RankLayout
    from nemo_upcycle.formats.base import open_dense

    src = open_dense(tiny_llama)
    opts = UpcycleOptions(4, 2, shared_experts=2, moe_shared_expert_gate=True)
    one = MegatronFiller(src.get, src.config, opts, RankLayout(), num_local_experts=4)
    tp = [MegatronFiller(src.get, src.config, opts, RankLayout(tp_rank=r, tp_size=2), num_local_experts=4)
          for r in range(2)]
    fc1 = [f.tensor("decoder.layers.1.mlp.shared_experts.linear_fc1.weight") for f in tp]
    full = one.tensor("decoder.layers.1.mlp.shared_experts.linear_fc1.weight")
    assert full.shape == (2 * 88, 36)
    for half in range(2):
        assert torch.equal(torch.cat([s.chunk(2)[half] for s in fc1]), full.chunk(2)[half])
    fc2 = [f.tensor("decoder.layers.1.mlp.shared_experts.linear_fc2.weight") for f in tp]
    assert torch.equal(torch.cat(fc2, 1), one.tensor("decoder.layers.1.mlp.shared_experts.linear_fc2.weight"))
    gate = [f.tensor("decoder.layers.1.mlp.shared_experts.gate_weight") for f in tp]
    assert all(torch.equal(g, torch.zeros(1, 36)) for g in gate)  # replicated, zero: sigmoid = 1/2


EXPORTS = [dict(moe_shared_expert_intermediate_size=44), dict(moe_shared_expert_intermediate_size=88,
                                                               moe_shared_expert_gate=True),
           dict(moe_layer_freq=[1, 0, 1]), dict(moe_layer_freq=2, moe_shared_expert_intermediate_size=44)]


@pytest.mark.parametrize("moe", EXPORTS, ids=["S1", "S2-gate", "mixed", "every2-S1"])
def test_trained_export_as_qwen2_moe(megatron_world, tiny_llama, token_ids, tmp_path, moe):
    """Trained (2 Adam steps, so the shared expert and its gate moved), exported by ``export_hf_mixtral`` in the format
    auto picks (Qwen2-MoE), loaded by transformers' ``Qwen2MoeForCausalLM``: NeMo's logits within 1e-5. Negative
    control: the same export read with the shared expert's gate forced back to zero."""
    from nemo_upcycle.engine.model import megatron_forward_logits
    from nemo_upcycle.offline.verify import load_moe, verify
    from test_export import export, trained_moe

    src, cfg, module = trained_moe(tiny_llama, **moe)
    out = export(module, cfg, src, tmp_path / "moe", token_ids)
    c = __import__("json").loads((out / "config.json").read_text())
    assert c["model_type"] == "qwen2_moe"
    ref = megatron_forward_logits(module, token_ids)[..., :99]
    hf = load_moe(out).eval()
    with torch.no_grad():
        assert (hf(token_ids).logits - ref).abs().max().item() < 1e-5
        assert (ref - load_llama(tiny_llama)(token_ids).logits).abs().max().item() > 1e-2  # training moved it
    assert verify(tiny_llama, out).passed(1e-5)
    if moe.get("moe_shared_expert_gate"):
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.mlp.shared_expert_gate.weight.zero_()
            assert (hf(token_ids).logits - ref).abs().max().item() > 1e-3
    elif moe.get("moe_shared_expert_intermediate_size"):
        with torch.no_grad():  # the doubled down projection halved again: Megatron's ungated expert at 1/2
            for layer in hf.model.layers:
                if hasattr(layer.mlp, "shared_expert"):
                    layer.mlp.shared_expert.down_proj.weight.mul_(0.5)
            assert (hf(token_ids).logits - ref).abs().max().item() > 1e-3
