"""A llama.cpp GGUF file as a dense Llama source, read lazily and dequantized to fp32 one tensor at a time.

What it does, and where each rule comes from:
  * The file is parsed with ``gguf.GGUFReader`` (llama.cpp's gguf-py), which memory-maps it: ``keys()``,
    ``shape()`` and ``dtype()`` come from the tensor infos; ``get(key)`` dequantizes that one tensor with
    ``gguf.quants.dequantize`` and returns float32. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
  * GGUF stores dimensions innermost first (ggml ``ne``), so the HF shape is the reversed GGUF shape; the
    row-major data is already [out, in].
  * Tensor names follow llama.cpp's ``gguf-py/gguf/tensor_mapping.py`` (``blk.N.attn_q`` <-> ``self_attn.q_proj``).
  * llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders the rows of q and k from HF's
    rotate-half RoPE layout to its interleaved one: ``w.reshape(H, 2, hd/2, in).swapaxes(1, 2)``. We undo it
    with the inverse (``reshape(H, hd/2, 2, in).swapaxes(1, 2)``; k uses the KV head count), as transformers'
    ``modeling_gguf_pytorch_utils.LlamaTensorProcessor`` does.
  * Llama 3.1+ RoPE scaling is written by that converter as a ``rope_freqs.weight`` tensor of per-frequency
    factors rather than metadata; we recover ``rope_scaling`` (rope_type llama3) from it and refuse factors that
    Meta's formula (low 1, high 4, original context 8192) does not reproduce.
  * The tokenizer is rebuilt by transformers (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``). Its Llama
    GGUF converter (4.57) swaps/duplicates bos and eos and ignores ``tokenizer.ggml.add_bos_token``, and
    ``save_pretrained`` would copy the whole GGUF as ``tokenizer.model``; we fix all three from the metadata.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import DenseSource, Reader, check_config_values, register_reader

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_HIDDEN = {"rope_freqs.weight"}  # folded into config["rope_scaling"]
# GGML storage types no Llama weight has: reported as their torch dtype so that ``check()`` refuses them by name
_NOT_WEIGHTS = {"F64": torch.float64, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}


def hf_name(gguf_name: str) -> str:
    """HF Llama name of a GGUF tensor; unknown tensors keep their GGUF name (so check() reports them)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half halves), per head."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFLlamaSource(DenseSource):
    """A dense Llama in a .gguf file (any quantization gguf-py can dequantize), seen in HF Llama form."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
            size = self.path.stat().st_size
            end = max((t.data_offset + t.n_bytes for t in self._reader.tensors), default=0)
            if end > size:
                raise ValueError(f"tensor data ends at byte {end}, file has {size}")
        except (ValueError, IndexError, KeyError, OSError, OverflowError, TypeError) as e:
            raise UpcycleError(f"{self.path} is not a readable GGUF file ({e.__class__.__name__}: {e}); "
                               "it is truncated or corrupt: re-download it.") from None
        self._fields = self._reader.fields
        self._tensors = {hf_name(t.name): t for t in self._reader.tensors}
        self.config = self._build_config()

    # -- metadata ----------------------------------------------------------------------------------
    def _meta(self, key: str, default=None):
        f = self._fields.get(key)
        if f is None or not f.types:
            return default
        try:
            return f.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise UpcycleError(f"{self.path}: metadata {key} is unreadable ({e}); "
                               "the file is corrupt: re-download it.") from None

    def _build_config(self) -> dict:
        arch = self._meta("general.architecture")
        a = lambda k, d=None: self._meta(f"{arch}.{k}", d)  # noqa: E731
        n_tokens = len(self._fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in self._fields else None
        c = {"architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
             "model_type": "llama" if arch == "llama" else arch,
             "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
             "hidden_size": a("embedding_length"), "intermediate_size": a("feed_forward_length"),
             "num_hidden_layers": a("block_count"), "num_attention_heads": a("attention.head_count"),
             "num_key_value_heads": a("attention.head_count_kv", a("attention.head_count")),
             "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-5), "rope_theta": a("rope.freq_base", 10000.0),
             "max_position_embeddings": a("context_length", 2048), "vocab_size": n_tokens or a("vocab_size"),
             "tie_word_embeddings": "output.weight" not in {t.name for t in self._reader.tensors},
             "rope_scaling": None}
        c = {k: v for k, v in c.items() if v is not None or k == "rope_scaling"}
        if isinstance(c.get("num_key_value_heads"), list):  # per-layer KV heads: not a plain Llama
            c["num_key_value_heads"] = max(c["num_key_value_heads"])
        if c.get("vocab_size") is None and "model.embed_tokens.weight" in self._tensors:
            c["vocab_size"] = self.shape("model.embed_tokens.weight")[0]
        head_dim = a("attention.key_length") or a("rope.dimension_count")
        if head_dim:
            c["head_dim"] = head_dim
        for gkey, hkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("padding_token_id", "pad_token_id")):
            v = self._meta(f"tokenizer.ggml.{gkey}")
            if v is not None:
                c[hkey] = v
        if a("expert_count", 0):  # an MoE GGUF: let check() refuse it
            c["num_local_experts"], c["num_experts_per_tok"] = a("expert_count"), a("expert_used_count", 0)
        stype = a("rope.scaling.type")
        if stype and stype != "none":
            c["rope_scaling"] = {"rope_type": stype, "factor": a("rope.scaling.factor", 1.0)}
            if a("rope.scaling.original_context_length"):
                c["rope_scaling"]["original_max_position_embeddings"] = a("rope.scaling.original_context_length")
        if "rope_freqs.weight" in self._tensors and c.get("hidden_size") and c.get("num_attention_heads"):
            check_config_values(c, self.config_where, ("hidden_size", "num_attention_heads", "head_dim"))
            c["rope_scaling"] = self._llama3_rope(c)
        return c

    @property
    def config_where(self) -> str:
        return f"{self.path} (GGUF metadata, in HF config names)"

    def _llama3_rope(self, c: dict) -> dict | None:
        """Recover Llama 3.1-style rope_scaling from llama.cpp's rope_freqs tensor (per-frequency divisors)."""
        got = self._raw("rope_freqs.weight").astype(np.float64)
        if np.all(got == 1.0):
            return None
        dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        low, high, orig = 1.0, 4.0, 8192
        wavelen = 2 * math.pi * float(c["rope_theta"]) ** (np.arange(0, dim, 2) / dim)
        smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)  # 1: kept, 0: divided by factor
        i = int(np.argmin(smooth))  # the lowest frequency pins the factor: r = 1 / ((1 - s) / factor + s)
        factor = float((1 - smooth[i]) / (1 / got[i] - smooth[i])) if smooth[i] < 1 and got.size == smooth.size else 1.0
        factor = float(f"{factor:.6g}")  # float32 data: 8.0000005 -> 8
        want = 1 / ((1 - smooth) / factor + smooth)
        if len(want) != got.size or not np.allclose(got, want, rtol=1e-4):
            raise UpcycleError(f"{self.path}: rope_freqs.weight does not match Llama 3 RoPE scaling "
                               f"(factor {factor:g}, low 1, high 4, context 8192); "
                               "convert the original HF checkpoint instead.")
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": orig}

    # -- tensors -----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return [k for k in self._tensors if k not in _HIDDEN]

    def _tensor(self, key: str):
        try:
            return self._tensors[key]
        except KeyError:
            raise UpcycleError(f"{self.path} has no tensor {key}.") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensor(key).shape))

    def dtype(self, key: str) -> torch.dtype:
        """float32 (every weight type is dequantized to it), or the integer / float64 type ``check()`` refuses."""
        return _NOT_WEIGHTS.get(self._tensor(key).tensor_type.name, torch.float32)

    def _raw(self, key: str) -> np.ndarray:
        """Dequantized fp32 in HF shape, before the q/k un-permute (a fresh array, not a view of the file)."""
        from gguf.quants import dequantize

        t = self._tensor(key)
        try:
            w = dequantize(t.data, t.tensor_type).reshape(self.shape(key))
        except (NotImplementedError, ValueError) as e:
            raise UpcycleError(f"{self.path}: cannot dequantize {t.name} ({t.tensor_type.name}: {e}); "
                               "re-quantize to a type gguf-py supports (e.g. Q8_0) or use the HF checkpoint.") from None
        w = w.astype(np.float32, copy=False)
        return w.copy() if np.may_share_memory(w, t.data) else w

    def get(self, key: str) -> torch.Tensor:
        w = self._raw(key)
        permuted = self.config["model_type"] == "llama"  # llama.cpp's LlamaModel permutes q / k; its Qwen2Model not
        if permuted and key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            c = self.config
            heads = (c["num_attention_heads"] if ".q_proj." in key
                     else c.get("num_key_value_heads") or c["num_attention_heads"])
            w = np.ascontiguousarray(unpermute_rope(w, heads))
        return torch.from_numpy(w)

    # -- tokenizer ---------------------------------------------------------------------------------
    def save_tokenizer(self, out_dir: Path) -> list[str]:
        from transformers import AutoTokenizer, GenerationConfig

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:  # transformers raises many types for unsupported tokenizers
            raise UpcycleError(f"{self.path}: transformers cannot build a tokenizer from this GGUF "
                               f"({e.__class__.__name__}: {e}); "
                               "copy the original HF tokenizer files instead.") from None
        tokens = self._fields.get("tokenizer.ggml.tokens")
        token = lambda i: tokens.contents(i) if tokens is not None and i is not None and i < len(tokens.data) else None  # noqa: E731
        c = self.config
        for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "pad_token_id"),
                          ("unk_token", None)):
            name = token(c.get(key) if key else self._meta("tokenizer.ggml.unknown_token_id"))
            if name is not None:
                setattr(tok, attr, name)
        add_bos = self._meta("tokenizer.ggml.add_bos_token")
        if add_bos is not None and hasattr(tok, "add_bos_token"):
            tok.add_bos_token = bool(add_bos)
        if hasattr(tok, "vocab_file"):
            tok.vocab_file = None  # else save_pretrained copies the GGUF itself as tokenizer.model
        written = {Path(p).name for p in tok.save_pretrained(str(out_dir)) if Path(p).is_file()}
        gen = {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in c}
        if gen:
            GenerationConfig(**gen).save_pretrained(str(out_dir))
            written.add("generation_config.json")
        return sorted(written)


register_reader(Reader("gguf", lambda p: p.is_file() and p.suffix.lower() == ".gguf", GGUFLlamaSource))
