"""A Qwen2 dense source online: ``UpcycledLlamaConfig.from_dense`` sets Megatron's ``add_qkv_bias``, the filler carries
the q/k/v biases into ``linear_qkv.bias`` (per TP rank), the MoE at step 0 computes transformers' ``Qwen2ForCausalLM``
logits (fp32, within 1e-5), and after two training steps the HF Qwen2-MoE export reproduces NeMo's logits in
transformers. Negative controls: the biases zeroed in Megatron; a Llama-configured model refused for a Qwen2 source.
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_qwen2

pytestmark = pytest.mark.slow  # imports NeMo (~25 s)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_qwen2(tmp_path_factory.mktemp("qwen2") / "dense")


def test_qwen2_step0_and_export(megatron_world, qwen2, token_ids, tmp_path):
    from nemo_upcycle.engine.model import megatron_forward_logits
    from nemo_upcycle.offline.verify import load_dense, load_moe
    from test_export import export, trained_moe

    dense = load_dense(qwen2)
    src, cfg, module = trained_moe(qwen2, steps=0, moe_shared_expert_intermediate_size=44)
    assert cfg.add_qkv_bias
    ref = dense(token_ids).logits
    assert (megatron_forward_logits(module, token_ids)[..., :99] - ref).abs().max().item() < 1e-5
    src, cfg, module = trained_moe(qwen2, steps=2, moe_shared_expert_intermediate_size=44)
    out = export(module, cfg, src, tmp_path / "moe", token_ids)
    hf = load_moe(out).eval()
    assert hf.config.qkv_bias is True and type(hf).__name__ == "Qwen2MoeForCausalLM"
    got = megatron_forward_logits(module, token_ids)[..., :99]
    with torch.no_grad():
        assert (hf(token_ids).logits - got).abs().max().item() < 1e-5
        for layer in module.decoder.layers:  # negative control: Megatron without the biases
            layer.self_attention.linear_qkv.bias.zero_()
    assert (megatron_forward_logits(module, token_ids)[..., :99] - got).abs().max().item() > 1e-3


def test_filler_bias_shards(qwen2):
    from nemo_upcycle.core import UpcycleOptions
    from nemo_upcycle.engine.filler import MegatronFiller, RankLayout
    from nemo_upcycle.formats.base import open_dense
    from nemo_upcycle.formats.keymap import merge_qkv

    src = open_dense(qwen2)
    opts = UpcycleOptions(4, 2)
    name = "decoder.layers.2.self_attention.linear_qkv.bias"
    one = MegatronFiller(src.get, src.config, opts, RankLayout(), num_local_experts=4).tensor(name)
    parts = [MegatronFiller(src.get, src.config, opts, RankLayout(tp_rank=r, tp_size=2), num_local_experts=4)
             .tensor(name) for r in range(2)]
    assert torch.equal(torch.cat(parts), one)
    q, k, v = (src.get(f"model.layers.2.self_attn.{p}_proj.bias") for p in "qkv")
    assert torch.equal(one, merge_qkv(q[:, None], k[:, None], v[:, None], 6, 2)[:, 0])


def test_llama_config_for_a_qwen2_source_refused(megatron_world, qwen2):
    from nemo_upcycle.engine.config import UpcycledLlamaConfig
    from nemo_upcycle.engine.cpu import cpu_config_overrides
    from nemo_upcycle.engine.model import check_dense_matches
    from nemo_upcycle.errors import UpcycleError
    from nemo_upcycle.formats.base import open_dense

    src = open_dense(qwen2)
    good = UpcycledLlamaConfig.from_dense(src.config, **cpu_config_overrides())
    check_dense_matches(src, good)
    bad = UpcycledLlamaConfig.from_dense({**src.config, "model_type": "llama"}, **cpu_config_overrides())
    with pytest.raises(UpcycleError, match="add_qkv_bias=True but the MoE config says False"):
        check_dense_matches(src, bad)
