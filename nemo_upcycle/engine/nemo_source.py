"""A NeMo 2 dense Llama checkpoint (``<ckpt>/context`` + ``<ckpt>/weights``) as a ``DenseSource``.

The config comes from the checkpoint's own context (``nemo.lightning.io.load_context``); the weights from
its Megatron distributed checkpoint, read with PyTorch's distributed-checkpoint reader one stored key at a
time (no process group needed). Megatron stores each per-layer parameter as one tensor stacked over the
layers (``decoder.layers.mlp.linear_fc1.weight`` [L, 2F, D]); a stacked key is read once, kept while its
layers are used, and served under HF Llama names by the key table (``formats.keymap``: q/k/v split from
``linear_qkv``, gate/up from fc1), so the upcycling code is the same as for HF and GGUF sources. Memory: at most the
dense model, never the MoE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import DenseSource, Reader, is_nemo_checkpoint, register_reader
from nemo_upcycle.formats.keymap import KEYMAP, Sizes, hf_config, hf_values, megatron_values


def stacked(name: str) -> str:
    """Where a NeMo 2 checkpoint stores a Megatron parameter: per-layer ones stacked over the layers."""
    return name.replace("decoder.layers.{layer}.", "decoder.layers.")


class NeMoDenseSource(DenseSource):
    """Serve a NeMo 2 dense Llama checkpoint under HF Llama names."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(path)
        try:
            from nemo.lightning.io import load_context

            cfg = load_context(self.path / "context", subpath="model.config")
        except Exception as e:  # a broken context raises many different errors
            raise UpcycleError(f"{self.path}/context cannot be read ({e.__class__.__name__}); "
                               "is this a NeMo 2 checkpoint?") from None
        if getattr(cfg, "num_moe_experts", None):
            raise UpcycleError(f"{self.path} is already a Mixture-of-Experts (num_moe_experts={cfg.num_moe_experts}); "
                               "upcycling needs a dense checkpoint.")
        self.nemo_config = cfg
        self.config = self._hf_config(cfg)
        try:
            self._reader = FileSystemReader(str(self.path / "weights"))
            self._meta = self._reader.read_metadata().state_dict_metadata
        except Exception as e:
            raise UpcycleError(f"{self.path}/weights is not a readable distributed checkpoint "
                               f"({e.__class__.__name__}); re-save it.") from None
        self._prefix = "module." if any(k.startswith("module.") for k in self._meta) else ""
        self._cache: dict[str, torch.Tensor] = {}
        self._shapes = None
        self._sizes = Sizes.of(hf_values(self.config, rope=False))

    @staticmethod
    def _hf_config(c) -> dict:
        act = getattr(c.activation_func, "__name__", str(c.activation_func))
        llama = c.gated_linear_unit and act == "silu" and c.normalization == "RMSNorm"
        hf = {"model_type": "llama" if llama else f"nemo:{act}", "architectures": ["LlamaForCausalLM"],
              **hf_config(megatron_values(c)), "hidden_act": "silu",
              "attention_bias": bool(c.add_bias_linear or c.add_qkv_bias), "mlp_bias": bool(c.add_bias_linear)}
        if hf["vocab_size"] is None:
            raise UpcycleError(f"{c.__class__.__name__} in the checkpoint has no vocab_size; it cannot be read "
                               "without its tokenizer.")
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

    # -- DenseSource -----------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:  # built once: check() asks for every key's shape
            self._shapes = super().expected_shapes()
        return self._shapes

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
            raise UpcycleError(f"{self.path}: {key} has shape {list(t.shape)} but the config implies {list(want)}; "
                               "the checkpoint does not match its context.")
        return t

    def _get(self, key: str) -> torch.Tensor:
        """An HF Llama tensor: its row of the key table, read from the stored (stacked) Megatron tensor."""
        try:
            hit = KEYMAP.hf(key)
        except KeyError:
            hit = None
        if hit is None or hit.row.hf[hit.part].made_from is not None:  # a MoE tensor: not in a dense checkpoint
            raise UpcycleError(f"{self.path} has no tensor {key}.")
        t = self._load(self._stored(*(stacked(m) for m in hit.row.megatron)))
        return hit.row.to_hf(t if hit.layer is None else t[hit.layer], self._sizes)[hit.part]

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
