"""Dense Llama sources, read lazily one tensor at a time: an HF directory or a GGUF file.

A source exposes the HF Llama key names and config, whatever is on disk:
  ``config``  dict in HF ``LlamaConfig`` form (config.json content)
  ``keys()``, ``shape(key)``, ``dtype(key)``, ``get(key)`` (a CPU tensor; only that tensor is read)
  ``save_tokenizer(out_dir)`` carries the tokenizer (and generation config) over.

``open_dense(path)`` picks the reader and checks that the source is a dense Llama whose tensors agree
with its config; every problem is an ``UpcycleError`` of one line.
"""

from __future__ import annotations

import abc
import json
import shutil
from pathlib import Path
from typing import Iterable

import torch

from ..errors import UpcycleError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_moe_experts")


class DenseSource(abc.ABC):
    """Common checks for dense Llama sources; subclasses implement the tensor access."""

    path: Path
    config: dict

    # -- tensor access (subclasses) --------------------------------------------------------------
    @abc.abstractmethod
    def keys(self) -> list[str]:
        """See the module docstring."""

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """See the module docstring."""

    @abc.abstractmethod
    def dtype(self, key: str) -> torch.dtype:
        """See the module docstring."""

    @abc.abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """See the module docstring."""

    @abc.abstractmethod
    def save_tokenizer(self, out_dir: Path) -> list[str]:
        """See the module docstring."""

    # -- shared ----------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        c = self.config
        return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The dense Llama key -> shape map that the config implies."""
        c = self.config
        D, F, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
        H, KV, hd = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"], self.head_dim
        shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
        if not self.tied:
            shapes["lm_head.weight"] = (V, D)
        for i in range(L):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
                p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F),
            })
        return shapes

    def check(self) -> "DenseSource":
        """Refuse anything but a dense Llama whose tensors agree with its config."""
        c = self.config
        moe = [k for k in MOE_CONFIG_KEYS if c.get(k)]
        if moe:
            raise UpcycleError(f"{self.path} is already a Mixture-of-Experts ({moe[0]}={c[moe[0]]}); upcycling needs a dense Llama checkpoint.")
        mt = c.get("model_type")
        if mt != "llama":
            raise UpcycleError(f"{self.path} is model_type {mt!r}, not a dense Llama ('llama'); only Llama-architecture checkpoints can be upcycled.")
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise UpcycleError(f"{self.path} sets {flag}=true; HF Mixtral has no biases, so this Llama variant cannot be upcycled to Mixtral.")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise UpcycleError(f"{self.path} uses hidden_act={act!r}; Llama/Mixtral experts are SwiGLU ('silu').")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in c]
        if missing:
            raise UpcycleError(f"{self.path}: config lacks {', '.join(missing)}; is this an HF Llama config.json?")
        expected = self.expected_shapes()
        have = set(self.keys())
        absent = [k for k in expected if k not in have]
        if absent:
            raise UpcycleError(f"{self.path} lacks {len(absent)} tensor(s) the config implies, e.g. {absent[0]}; the checkpoint is incomplete or its config is wrong.")
        extra = sorted(k for k in have - set(expected) if not k.endswith("rotary_emb.inv_freq"))
        if extra:
            raise UpcycleError(f"{self.path} has {len(extra)} tensor(s) a dense Llama does not, e.g. {extra[0]}; is it another architecture?")
        for k, shp in expected.items():
            got = tuple(self.shape(k))
            if got != shp:
                raise UpcycleError(f"{self.path}: {k} has shape {list(got)} but the config implies {list(shp)}; the config does not match the weights.")
        return self


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UpcycleError(f"cannot read {path}: {e.__class__.__name__}: {e}; the file is corrupt.") from None


class HFLlamaSource(DenseSource):
    """An HF Llama directory: config.json, model.safetensors or sharded safetensors + index."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise UpcycleError(f"{path} has no config.json; point at an HF model directory (config.json + *.safetensors) or a .gguf file.")
        self.config = _read_json(cfg_path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            hint = " (found PyTorch .bin weights: re-save them with save_pretrained(safe_serialization=True))" if list(path.glob("*.bin")) else ""
            raise UpcycleError(f"{path} holds no .safetensors weights{hint}.")
        self._handles, self._where, self._span = {}, {}, {}
        for name in files:
            f = path / name
            if not f.is_file():
                raise UpcycleError(f"{path}: the index names {name}, which is missing; re-download or re-save the checkpoint.")
            data_start, header = _check_safetensors_size(f)
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise UpcycleError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it.") from None
            self._handles[name] = h
            for k in keys:
                self._where[k] = name
                begin, end = header[k]["data_offsets"]
                self._span[k] = (data_start + begin, end - begin)

    def keys(self) -> list[str]:
        return list(self._where)

    def _slice(self, key: str):
        try:
            return self._handles[self._where[key]].get_slice(key)
        except KeyError:
            raise UpcycleError(f"{self.path} has no tensor {key}.") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._slice(key).get_dtype()]

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor with plain file reads at its header offsets, not through safetensors' mmap: mapped
        pages once touched count toward RSS while the file stays open (the whole source, by the end)."""
        dtype, shape = self.dtype(key), self.shape(key)
        start, nbytes = self._span[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        with open(self.path / self._where[key], "rb", buffering=0) as fh:
            fh.seek(start)
            while got < nbytes:  # one read() returns at most ~2 GiB on Linux
                n = fh.readinto(view[got:])
                if not n:
                    raise UpcycleError(f"{fh.name} ended inside {key}; the file is truncated, re-download it.")
                got += n
        return buf.view(dtype).reshape(shape)

    def save_tokenizer(self, out_dir: Path) -> list[str]:
        copied = []
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, out_dir / name)
                copied.append(name)
        return copied


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _check_safetensors_size(f: Path) -> tuple[int, dict]:
    """A truncated file is caught here, before any tensor is read: header length + data end = file size.

    Returns the data section's file offset and the parsed header (tensor offsets are relative to it)."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past end of file")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise UpcycleError(f"{f} is truncated or corrupt ({e}); re-download or re-save it.") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise UpcycleError(f"{f} is truncated or corrupt: header promises {8 + n + end} bytes, file has {size}; re-download it.")
    return 8 + n, header


def open_dense(path: str | Path) -> DenseSource:
    """Open and check a dense Llama source: an HF directory, a .gguf file or a NeMo 2 checkpoint directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UpcycleError(f"{p} does not exist; pass an HF Llama directory, a .gguf file or a NeMo 2 checkpoint.")
    if p.is_dir() and (p / "context").is_dir() and (p / "weights").is_dir():
        from ..engine.nemo_source import NeMoDenseSource  # a NeMo 2 checkpoint: needs NeMo, imported only here

        src: DenseSource = NeMoDenseSource(p)
    elif p.is_dir():
        src = HFLlamaSource(p)
    elif p.suffix.lower() == ".gguf":
        from .gguf_source import GGUFLlamaSource

        src = GGUFLlamaSource(p)
    else:
        raise UpcycleError(f"{p} is neither a directory nor a .gguf file; pass an HF Llama directory or a .gguf file.")
    return src.check()


def read_dense_mlp(get, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of one dense layer, read with ``get(hf_key)`` (any source's ``get``)."""
    p = f"model.layers.{layer}.mlp."
    return get(p + "gate_proj.weight"), get(p + "up_proj.weight"), get(p + "down_proj.weight")


def total_bytes(src: DenseSource, keys: Iterable[str], dtype: torch.dtype | None = None) -> int:
    n = 0
    for k in keys:
        numel = 1
        for s in src.shape(k):
            numel *= s
        n += numel * (dtype or src.dtype(k)).itemsize
    return n
