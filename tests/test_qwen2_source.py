"""Qwen2 / Qwen2.5 dense sources (q/k/v biases, tied embeddings, rope theta 1e6, eps 1e-6): upcycled offline to HF
Qwen2-MoE and run by transformers' ``Qwen2MoeForCausalLM`` against transformers' ``Qwen2ForCausalLM`` (fp32, odd sizes,
within 1e-5); from an HF directory and from a GGUF that transformers' own GGUF loader reads. Negative controls: the
biases dropped from the MoE; Mixtral asked to hold the biases; sliding-window attention; another family.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import make_qwen2, max_logit_diff
from nemo_upcycle.core import UpcycleOptions
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.offline.convert import convert
from nemo_upcycle.offline.verify import load_dense, load_moe

ATOL = 1e-5


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_qwen2(tmp_path_factory.mktemp("qwen2") / "dense")


@pytest.mark.parametrize("kw", [dict(), dict(shared_experts=1, moe_shared_expert_gate=True),
                                dict(num_moe_experts=8, moe_router_topk=4, granularity=4, shared_experts=2),
                                dict(moe_layers="every:2", shared_experts=1)],
                         ids=["E4k2", "S1-gate", "G4-S2", "every2"])
def test_qwen2_upcycled_equals_dense(qwen2, tmp_path, token_ids, kw):
    opts = UpcycleOptions(**{"num_moe_experts": 4, "moe_router_topk": 2, **kw})
    res = convert(qwen2, tmp_path / "moe", opts, progress=False)
    assert res.config["model_type"] == "qwen2_moe" and res.config["qkv_bias"] is True
    assert res.config["tie_word_embeddings"] is True and res.config["rope_theta"] == 1e6
    dense, moe = load_dense(qwen2), load_moe(res.out_dir)
    assert type(dense).__name__ == "Qwen2ForCausalLM"
    assert max_logit_diff(dense, moe, token_ids) < ATOL
    with torch.no_grad():  # negative control: the biases dropped
        moe.model.layers[1].self_attn.k_proj.bias.zero_()
    assert max_logit_diff(dense, moe, token_ids) > 1e-3


def test_qwen2_refusals(qwen2, tmp_path):
    with pytest.raises(UpcycleError, match="--format mixtral cannot hold this model: the source's attention has q/k/v "
                                           "biases"):
        convert(qwen2, tmp_path / "m", UpcycleOptions(4, 2), progress=False, fmt="mixtral")
    sliding = make_qwen2(tmp_path / "sliding", use_sliding_window=True, sliding_window=16)
    with pytest.raises(UpcycleError, match="use_sliding_window=true"):
        convert(sliding, tmp_path / "s", UpcycleOptions(4, 2), progress=False)
    other = make_qwen2(tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3"}))
    with pytest.raises(UpcycleError, match="model_type 'qwen3', not a dense Llama"):
        convert(other, tmp_path / "o", UpcycleOptions(4, 2), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "sliding"]  # nothing written


def _qwen2_gguf(dense_dir, path):
    """The HF Qwen2 checkpoint as an F32 GGUF in llama.cpp's names (convert_hf_to_gguf.py Qwen2Model: no q/k row
    permutation, biases as blk.N.attn_{q,k,v}.bias), with a byte-level BPE tokenizer of the vocabulary's size."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((dense_dir / "config.json").read_text())
    sd = load_file(str(dense_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    tokens = [chr(33 + i) for i in range(cfg["vocab_size"] - 2)] + ["ab", "abc"]
    w.add_token_list(tokens)
    w.add_token_types([1] * cfg["vocab_size"])
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, t in sd.items():
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        else:
            i, rest = k.split(".", 3)[2:]
            mod, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{parts[mod]}.{kind}"
        w.add_tensor(name, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_qwen2_gguf_source(qwen2, tmp_path, token_ids):
    """Every tensor of the GGUF source equals transformers' Qwen2 loaded from the same GGUF (its own dequantiser and
    name map), and equals the HF checkpoint it was written from; the upcycled MoE equals the dense model."""
    from nemo_upcycle.formats.base import open_dense

    f = _qwen2_gguf(qwen2, tmp_path / "q.gguf")
    src = open_dense(f)
    assert src.config["model_type"] == "qwen2" and src.tied
    ref = load_dense(f)
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    sd = ref.state_dict()
    for k in src.keys():
        assert torch.equal(src.get(k), sd[k]), k
    assert max_logit_diff(load_dense(qwen2), ref, token_ids) < ATOL
    out = convert(f, tmp_path / "moe", UpcycleOptions(4, 2, shared_experts=1), progress=False).out_dir
    assert max_logit_diff(ref, load_moe(out), token_ids) < ATOL


def test_model_auto_reads_the_source(qwen2, tmp_path):
    """model=auto: the model group from the source's config (family named), interpolations resolved after it; the
    refusals name model.source, the sliding window, another RoPE scaling."""
    from nemo_upcycle.config.compose import compose
    from nemo_upcycle.formats.keymap import hf_values

    r = compose("tiny_llama_upcycle", ["model=auto", f"model.source={qwen2}", "moe=e8_top2_shared"])
    m, want = r.model, hf_values(json.loads((qwen2 / "config.json").read_text()))
    assert (m.family, m.name, m.add_qkv_bias) == ("qwen2", "auto:qwen2", True)
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_query_groups, m.rotary_base, m.layernorm_epsilon,
            m.share_embeddings_and_output_weights) == (want["num_layers"], 36, 44, 2, 1e6, 1e-6, True)
    assert r.moe.moe_shared_expert_intermediate_size == 44  # ${model.ffn_hidden_size} of the source, not a default
    llama = compose("smollm2_135m_upcycle", ["model=auto", "model.source=smollm2"]).model
    assert (llama.family, llama.add_qkv_bias, llama.num_layers, llama.hidden_size) == ("llama3", False, 30, 576)
    with pytest.raises(UpcycleError, match="model=auto reads the sizes from model.source, which is None"):
        compose("tiny_llama_upcycle", ["model=auto"])
    sliding = make_qwen2(tmp_path / "sliding", use_sliding_window=True, sliding_window=16)
    with pytest.raises(UpcycleError, match="use_sliding_window=true"):
        compose("tiny_llama_upcycle", ["model=auto", f"model.source={sliding}"])
    yarn = make_qwen2(tmp_path / "yarn", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 32})
    with pytest.raises(UpcycleError, match="rope_scaling type 'yarn'"):
        compose("tiny_llama_upcycle", ["model=auto", f"model.source={yarn}"])


def test_recipe_without_biases_for_a_qwen2_source_refused_up_front(qwen2):
    """The precheck (before NeMo) names the q/k/v bias mismatch; model=auto, its neighbour, is accepted."""
    from nemo_upcycle.apps.precheck import check_source
    from nemo_upcycle.config.compose import compose

    overrides = [f"model.source={qwen2}", "model.rotary_base=1000000.0", "model.layernorm_epsilon=1e-6",
                 "model.share_embeddings_and_output_weights=true"]
    with pytest.raises(UpcycleError, match="has q/k/v biases but the recipe says model.add_qkv_bias=False; use "
                                           "model=auto"):
        check_source(compose("tiny_llama_upcycle", overrides))
    assert check_source(compose("tiny_llama_upcycle", ["model=auto", f"model.source={qwen2}"]))["model_type"] == "qwen2"
