"""Dense Llama sources, read lazily one tensor at a time, and the registry of their formats.

A source exposes HF Llama names and config whatever is on disk: ``config`` (an HF ``LlamaConfig`` dict), ``keys()``,
``shape(key)``, ``dtype(key)``, ``get(key)`` (a CPU tensor; only that one is read) and ``save_tokenizer(out_dir)``.
``open_dense(path)`` picks the registered reader (``formats.hf_llama``: an HF directory; ``formats.gguf``: a GGUF
file; ``engine.nemo_source``: a NeMo 2 checkpoint, registered by the engine) and checks that the source is a dense
Llama whose tensors agree with its config; ``check()`` also refuses, by name, config values no Llama has (a size
that is not a positive integer; a NaN or infinite ``rms_norm_eps`` / ``rope_theta``) and weight dtypes a Llama cannot
have. ``locate(path)`` says why a path cannot be opened (missing, a broken link, a loop) before anything is read.
Every problem is a one-line ``UpcycleError``.
"""

from __future__ import annotations

import abc
import errno
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.keymap import DENSE_MLP, llama_shapes

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
        """The dense Llama key -> shape map that the config implies (the key table's ``llama_shapes``)."""
        return llama_shapes(self.config)

    def check(self) -> "DenseSource":
        """Refuse anything but a dense Llama whose tensors agree with its config."""
        c = self.config
        moe = [k for k in MOE_CONFIG_KEYS if c.get(k)]
        if moe:
            raise UpcycleError(f"{self.path} is already a Mixture-of-Experts ({moe[0]}={c[moe[0]]}); "
                               "upcycling needs a dense Llama checkpoint.")
        mt = c.get("model_type")
        if mt != "llama":
            raise UpcycleError(f"{self.path} is model_type {mt!r}, not a dense Llama ('llama'); "
                               "only Llama-architecture checkpoints can be upcycled.")
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise UpcycleError(f"{self.path} sets {flag}=true; "
                                   "HF Mixtral has no biases, so this Llama variant cannot be upcycled to Mixtral.")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise UpcycleError(f"{self.path} uses hidden_act={act!r}; Llama/Mixtral experts are SwiGLU ('silu').")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if k not in c]
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
            raise UpcycleError(f"{self.path} lacks {len(absent)} tensor(s) the config implies, e.g. {absent[0]}; "
                               "the checkpoint is incomplete or its config is wrong.")
        extra = sorted(k for k in have - set(expected) if not k.endswith("rotary_emb.inv_freq"))
        if extra:
            raise UpcycleError(f"{self.path} has {len(extra)} tensor(s) a dense Llama does not, e.g. {extra[0]}; "
                               "is it another architecture?")
        for k, shp in expected.items():
            got = tuple(self.shape(k))
            if got != shp:
                raise UpcycleError(f"{self.path}: {k} has shape {list(got)} but the config implies {list(shp)}; "
                                   "the config does not match the weights.")
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


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UpcycleError(f"cannot read {path}: {e.__class__.__name__}: {e}; the file is corrupt.") from None


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


@dataclass(frozen=True)
class Reader:
    """A dense-source format: ``matches(path)`` says whether it reads ``path``, ``open(path)`` opens it."""

    name: str
    matches: Callable[[Path], bool]
    open: Callable[[Path], "DenseSource"]
    priority: int = 0  # higher is tried first (a NeMo checkpoint is also a directory)


READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> None:
    """Add a format (``formats.hf_llama`` and ``formats.gguf`` here; the engine adds NeMo 2 checkpoints)."""
    READERS[reader.name] = reader


def is_nemo_checkpoint(path: Path) -> bool:
    """A NeMo 2 checkpoint directory: ``context/`` and ``weights/`` (read by the engine's reader)."""
    return path.is_dir() and (path / "context").is_dir() and (path / "weights").is_dir()


_OPENED: dict = {}  # single-file sources by (path, mtime, size): parsing a GGUF's metadata costs seconds
_OPENED_MAX = 4


def open_dense(path: str | Path) -> DenseSource:
    """Open and check a dense Llama source with the first registered reader that matches it. A single-file source
    (GGUF) is opened once per process while the file is unchanged (its readers are read-only and lazy): gguf-py
    parses the tokenizer's metadata element by element (~5 s for SmolLM2's 49k tokens), and a training run opens its
    source for the tokenizer, the online upcycling, the step-0 check and the dense reference."""
    p = locate(path)
    key = None
    if p.is_file():
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
        if key in _OPENED:
            return _OPENED[key]
    for reader in sorted(READERS.values(), key=lambda r: -r.priority):
        if reader.matches(p):
            src = reader.open(p).check()
            if key is not None:
                while len(_OPENED) >= _OPENED_MAX:
                    _OPENED.pop(next(iter(_OPENED)))
                _OPENED[key] = src
            return src
    if is_nemo_checkpoint(p):
        raise UpcycleError(f"{p} is a NeMo 2 checkpoint, whose reader is part of the engine (NeMo); open it through "
                           "nemo-upcycle or train.py, or import nemo_upcycle.engine.nemo_source first.")
    raise UpcycleError(f"{p} is neither a directory nor a .gguf file; pass an HF Llama directory or a .gguf file.")


def read_dense_mlp(get, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of one dense layer, read with ``get(hf_key)`` (any source's ``get``)."""
    return tuple(get(t.key(layer)) for t in DENSE_MLP)
