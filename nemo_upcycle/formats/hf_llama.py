"""An HF Llama directory (config.json, model.safetensors or shards + index) as a dense source.

Tensors are read with plain file reads at the offsets of the safetensors header (the documented format: 8-byte
header length, JSON header, raw data), after the file size was checked against the header (a truncated shard is
named before anything is read); safetensors' own ``safe_open`` checks the header.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.formats.base import (
    TOKENIZER_FILES,
    DenseSource,
    Reader,
    is_nemo_checkpoint,
    read_json,
    register_reader,
)


class HFLlamaSource(DenseSource):
    """An HF Llama directory: config.json, model.safetensors or sharded safetensors + index."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise UpcycleError(f"{path} has no config.json; "
                               "point at an HF model directory (config.json + *.safetensors) or a .gguf file.")
        self.config = read_json(cfg_path)
        if not isinstance(self.config, dict):
            raise UpcycleError(f"{cfg_path} holds {type(self.config).__name__}, not a JSON object; is this an HF "
                               "config.json?")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UpcycleError(f"{index} has no weight_map of tensor -> file; the index is corrupt: re-save the "
                                   "checkpoint.")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            hint = (" (found PyTorch .bin weights: re-save them with save_pretrained(safe_serialization=True))"
                    if list(path.glob("*.bin")) else "")
            raise UpcycleError(f"{path} holds no .safetensors weights{hint}.")
        self._handles, self._where, self._span, self._dtypes = {}, {}, {}, {}
        for name in files:
            f = path / name
            if not f.is_file():
                raise UpcycleError(f"{path}: the index names {name}, which is missing; "
                                   "re-download or re-save the checkpoint.")
            data_start, header = check_safetensors_size(f)
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise UpcycleError(f"{f} is not a readable safetensors file ({e}); "
                                   "re-download or re-save it.") from None
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
        if name not in ST_DTYPES:
            raise UpcycleError(f"{self.path}: {key} is stored as {name}; a Llama's weights are float32, float16 or "
                               "bfloat16: re-save the checkpoint in one of them.")
        return ST_DTYPES[name]

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


ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def check_safetensors_size(f: Path) -> tuple[int, dict]:
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
        raise UpcycleError(f"{f} is truncated or corrupt: header promises {8 + n + end} bytes, file has {size}; "
                           "re-download it.")
    return 8 + n, header


register_reader(Reader("hf", lambda p: p.is_dir() and not is_nemo_checkpoint(p), HFLlamaSource))
