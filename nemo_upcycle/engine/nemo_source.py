"""A NeMo 2 dense Llama checkpoint (``<ckpt>/context`` + ``<ckpt>/weights``) as a ``DenseSource``.

The config comes from the checkpoint's own context (``nemo.lightning.io.load_context``); the weights from
its Megatron distributed checkpoint, read with PyTorch's distributed-checkpoint reader one stored key at a
time (no process group needed). Megatron stores each per-layer parameter as one tensor stacked over the
layers (``decoder.layers.mlp.linear_fc1.weight`` [L, 2F, D]); a stacked key is read once, kept while its
layers are used, and served under HF Llama names (q/k/v split from ``linear_qkv``, gate/up from fc1), so
the upcycling code is the same as for HF and GGUF sources. Memory: at most the dense model, never the MoE.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import DenseSource, Reader, is_nemo_checkpoint, register_reader
from nemo_upcycle.engine.filler import split_qkv

_PER_LAYER = {
    "input_layernorm.weight": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "post_attention_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    "self_attn.o_proj.weight": ("self_attention.linear_proj.weight",),
    "mlp.down_proj.weight": ("mlp.linear_fc2.weight",),
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


class NeMoDenseSource(DenseSource):
    """Serve a NeMo 2 dense Llama checkpoint under HF Llama names."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(path)
        try:
            from nemo.lightning.io import load_context

            cfg = load_context(self.path / "context", subpath="model.config")
        except Exception as e:  # a broken context raises many different errors
            raise UpcycleError(f"{self.path}/context cannot be read ({e.__class__.__name__}); is this a NeMo 2 checkpoint?") from None
        if getattr(cfg, "num_moe_experts", None):
            raise UpcycleError(f"{self.path} is already a Mixture-of-Experts (num_moe_experts={cfg.num_moe_experts}); upcycling needs a dense checkpoint.")
        self.nemo_config = cfg
        self.config = self._hf_config(cfg)
        try:
            self._reader = FileSystemReader(str(self.path / "weights"))
            self._meta = self._reader.read_metadata().state_dict_metadata
        except Exception as e:
            raise UpcycleError(f"{self.path}/weights is not a readable distributed checkpoint ({e.__class__.__name__}); re-save it.") from None
        self._prefix = "module." if any(k.startswith("module.") for k in self._meta) else ""
        self._cache: dict[str, torch.Tensor] = {}

    @staticmethod
    def _hf_config(c) -> dict:
        act = getattr(c.activation_func, "__name__", str(c.activation_func))
        hf = {
            "model_type": "llama" if c.gated_linear_unit and act == "silu" and c.normalization == "RMSNorm" else f"nemo:{act}",
            "architectures": ["LlamaForCausalLM"], "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_query_groups or c.num_attention_heads,
            "head_dim": c.kv_channels or c.hidden_size // c.num_attention_heads, "vocab_size": c.vocab_size,
            "rms_norm_eps": c.layernorm_epsilon, "rope_theta": c.rotary_base, "max_position_embeddings": c.seq_length,
            "tie_word_embeddings": bool(c.share_embeddings_and_output_weights), "hidden_act": "silu",
            "attention_bias": bool(c.add_bias_linear or c.add_qkv_bias), "mlp_bias": bool(c.add_bias_linear),
        }
        if getattr(c, "scale_factor", None):
            hf["rope_scaling"] = {"rope_type": "llama3", "factor": c.scale_factor, "low_freq_factor": c.low_freq_factor,
                                  "high_freq_factor": c.high_freq_factor, "original_max_position_embeddings": c.old_context_len}
        if hf["vocab_size"] is None:
            raise UpcycleError(f"{c.__class__.__name__} in the checkpoint has no vocab_size; it cannot be read without its tokenizer.")
        return hf

    # -- stored keys -----------------------------------------------------------------------------
    def _stored(self, *names: str) -> str:
        for n in names:
            if self._prefix + n in self._meta:
                return self._prefix + n
        raise KeyError(names[0])

    def _load(self, key: str) -> torch.Tensor:
        from torch.distributed.checkpoint import load

        if key not in self._cache:
            md = self._meta[key]
            self._cache[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            load({key: self._cache[key]}, storage_reader=self._reader, no_dist=True)
        return self._cache[key]

    def _layer(self, i: int, *names: str) -> torch.Tensor:
        return self._load(self._stored(*("decoder.layers." + n for n in names)))[i]

    # -- DenseSource -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.expected_shapes())

    def shape(self, key: str) -> tuple[int, ...]:
        return self.expected_shapes()[key]  # the checkpoint's shapes are checked when a tensor is read

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[self._stored("embedding.word_embeddings.weight")].properties.dtype

    def get(self, key: str) -> torch.Tensor:
        t = self._get(key)
        want = self.expected_shapes().get(key)
        if want is not None and tuple(t.shape) != want:
            raise UpcycleError(f"{self.path}: {key} has shape {list(t.shape)} but the config implies {list(want)}; the checkpoint does not match its context.")
        return t

    def _get(self, key: str) -> torch.Tensor:
        V = self.config["vocab_size"]
        if key == "model.embed_tokens.weight":
            return self._load(self._stored("embedding.word_embeddings.weight"))[:V]
        if key == "lm_head.weight":
            return self._load(self._stored("output_layer.weight"))[:V]
        if key == "model.norm.weight":
            return self._load(self._stored("decoder.final_layernorm.weight"))
        m = _HF_LAYER.fullmatch(key)
        if not m:
            raise UpcycleError(f"{self.path} has no tensor {key}.")
        i, rest = int(m.group(1)), m.group(2)
        if rest in _PER_LAYER:
            return self._layer(i, *_PER_LAYER[rest])
        if rest.startswith("self_attn.") and rest[10] in "qkv":
            H = self.config["num_attention_heads"]
            q, k, v = split_qkv(self._layer(i, "self_attention.linear_qkv.weight"), H, self.config["num_key_value_heads"])
            return {"q": q, "k": k, "v": v}[rest[10]]
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            gate, up = self._layer(i, "mlp.linear_fc1.weight").chunk(2)
            return gate if rest.startswith("mlp.gate") else up
        raise UpcycleError(f"{self.path} has no tensor {key}.")

    def save_tokenizer(self, out_dir: Path) -> list[str]:
        tok = self.path / "context" / "nemo_tokenizer"
        copied = []
        if tok.is_dir():
            import shutil

            for f in tok.iterdir():
                if f.is_file():
                    shutil.copy2(f, out_dir / f.name)
                    copied.append(f.name)
        return copied


register_reader(Reader("nemo2", is_nemo_checkpoint, NeMoDenseSource, priority=1))
