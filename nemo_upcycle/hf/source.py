"""Dense Llama sources, read lazily one tensor at a time: an HF directory or a GGUF file.

A source exposes the HF Llama key names and config, whatever is on disk:
  ``config``  dict in HF ``LlamaConfig`` form (config.json content)
  ``keys()``, ``shape(key)``, ``dtype(key)``, ``get(key)`` (a CPU tensor; only that tensor is read)
  ``save_tokenizer(out_dir)`` carries the tokenizer (and generation config) over.

``open_dense(path)`` picks the reader and checks that the source is a dense Llama whose tensors agree
with its config; every problem is an ``UpcycleError`` of one line. ``check()`` also refuses, by name, config
values no Llama has (a size that is not a positive integer, ``36.0``, ``true`` or ``"36"``; a NaN or infinite
``rms_norm_eps`` / ``rope_theta``) and tensors of a dtype a Llama cannot have (float64, integers).
``locate(path)`` says why a path cannot be opened (missing, a broken link, a symlink loop) before anything is read.
"""

from __future__ import annotations

import abc
import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch

from ..errors import UpcycleError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_moe_experts")
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "max_position_embeddings")
POSITIVE_FLOAT_KEYS = ("rms_norm_eps", "rope_theta")
FLOAT_KEYS = ("initializer_range", "attention_dropout")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config_values(c: dict, where: str, keys: tuple = SIZE_KEYS) -> None:
    """Refuse, by name, values no Llama config has: sizes that are not positive integers (``36.0``, ``true``,
    ``"36"``, 0), NaN / infinite / non-positive ``rms_norm_eps`` and ``rope_theta``, malformed token ids and
    RoPE scaling. ``where`` names the file (``X/config.json``, ``X (GGUF metadata)``)."""
    for k in keys:
        v = c.get(k)
        if v is None and k in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            continue  # optional: defaults apply
        if not _is_int(v) or v < 1:
            what = f"a {type(v).__name__}" if not _is_int(v) else "not positive"
            raise UpcycleError(f"{where}: {k} = {json.dumps(v)} is {what}; a size must be a positive integer: "
                               "fix the config.")
    for k in POSITIVE_FLOAT_KEYS + FLOAT_KEYS:
        v = c.get(k)
        if v is None:
            continue
        positive = k in POSITIVE_FLOAT_KEYS
        if not _is_real(v) or not math.isfinite(v) or (positive and v <= 0) or v < 0:
            what = "positive" if positive else "non-negative"
            raise UpcycleError(f"{where}: {k} = {json.dumps(v)} is not a finite {what} number; fix the config.")
    for k in TOKEN_ID_KEYS:
        v = c.get(k)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(_is_int(i) and i >= -1 for i in ids):  # -1: "none" in some older configs
            raise UpcycleError(f"{where}: {k} = {json.dumps(v)} is not a token id (an integer >= 0, or a list of "
                               "them); fix the config.")
    rope = c.get("rope_scaling")
    if rope is not None:
        bad = not isinstance(rope, dict) or any(
            isinstance(v, bool) or (_is_real(v) and (not math.isfinite(v) or v <= 0)) for v in rope.values())
        if bad:
            raise UpcycleError(f"{where}: rope_scaling = {json.dumps(rope)} is not a mapping of finite positive "
                               "numbers; fix the config.")
    H, KV = c.get("num_attention_heads"), c.get("num_key_value_heads")
    if _is_int(H) and _is_int(KV) and H % KV:
        raise UpcycleError(f"{where}: num_attention_heads {H} is not a multiple of num_key_value_heads {KV}; "
                           "fix the config.")
    if _is_int(H) and c.get("head_dim") is None and _is_int(c.get("hidden_size")) and c["hidden_size"] % H:
        raise UpcycleError(f"{where}: hidden_size {c['hidden_size']} is not a multiple of num_attention_heads {H} "
                           "and head_dim is not given; fix the config.")


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
        check_config_values(c, self.config_where)
        have = set(self.keys())
        n_expected = 2 + (not self.tied) + 9 * c["num_hidden_layers"]
        n_have = len([k for k in have if not k.endswith("rotary_emb.inv_freq")])
        if n_have < n_expected:  # before the key table is built: a config claiming 1e9 layers must not build it
            raise UpcycleError(f"{self.path} holds {n_have} tensors but its config ({c['num_hidden_layers']} layers) "
                               f"implies {n_expected}; the checkpoint is incomplete or its config is wrong.")
        expected = self.expected_shapes()
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
        for k in expected:
            dt = self.dtype(k)
            if dt not in WEIGHT_DTYPES:
                raise UpcycleError(f"{self.path}: {k} is {str(dt).removeprefix('torch.')}; a Llama's weights are "
                                   "float32, float16 or bfloat16: re-save the checkpoint in one of them.")
        return self

    @property
    def config_where(self) -> str:
        """How messages name the config (overridden: ``X/config.json``, ``X (GGUF metadata)``)."""
        return f"{self.path} (config)"


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
        if not isinstance(self.config, dict):
            raise UpcycleError(f"{cfg_path} holds {type(self.config).__name__}, not a JSON object; is this an HF "
                               "config.json?")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UpcycleError(f"{index} has no weight_map of tensor -> file; the index is corrupt: re-save the "
                                   "checkpoint.")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            hint = " (found PyTorch .bin weights: re-save them with save_pretrained(safe_serialization=True))" if list(path.glob("*.bin")) else ""
            raise UpcycleError(f"{path} holds no .safetensors weights{hint}.")
        self._handles, self._where, self._span, self._dtypes = {}, {}, {}, {}
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
                self._dtypes[k] = header[k].get("dtype")

    @property
    def config_where(self) -> str:
        return str(self.path / "config.json")

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
        self._slice(key)
        name = self._dtypes[key]
        if name not in _ST_DTYPES:
            raise UpcycleError(f"{self.path}: {key} is stored as {name}; a Llama's weights are float32, float16 or "
                               "bfloat16: re-save the checkpoint in one of them.")
        return _ST_DTYPES[name]

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
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError):
        raise UpcycleError(f"{f} is corrupt: its header does not give every tensor's data offsets; "
                           "re-download it.") from None
    if 8 + n + end != size:
        raise UpcycleError(f"{f} is truncated or corrupt: header promises {8 + n + end} bytes, file has {size}; re-download it.")
    return 8 + n, header


def locate(path: str | Path, what: str = "an HF Llama directory, a .gguf file or a NeMo 2 checkpoint") -> Path:
    """The path, if it can be opened; else one line saying why: missing, a broken link, a symlink loop, no access."""
    p = Path(path).expanduser()
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UpcycleError(f"{p} is a symlink loop (its links lead back to themselves); pass {what}.") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            if p.is_symlink():
                raise UpcycleError(f"{p} is a broken symbolic link (to {os.readlink(p)}, which does not exist); "
                                   f"pass {what}.") from None
            raise UpcycleError(f"{p} does not exist; pass {what}.") from None
        raise UpcycleError(f"cannot open {p}: {e.strerror}; pass {what} you can read.") from None
    return p


def open_dense(path: str | Path) -> DenseSource:
    """Open and check a dense Llama source: an HF directory, a .gguf file or a NeMo 2 checkpoint directory."""
    p = locate(path)
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
