"""Write sharded safetensors whose layout is known before any tensor exists, one tensor at a time.

``safetensors.torch.save_file`` wants every tensor of a shard in memory at once. Upcycling knows every
output name, dtype and shape up front (they follow from the configs), so the header can be written
first and each tensor's bytes streamed right after it is made: peak memory is one dense layer, not one
shard. The file format is the documented one (8-byte little-endian header length, JSON header with
``dtype``/``shape``/``data_offsets``, then the raw little-endian data); files are read back with the
safetensors library itself in the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import torch

ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Cut the ordered tensor list into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(specs: list[TensorSpec], metadata: Optional[dict]) -> bytes:
    hdr: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for s in specs:
        hdr[s.name] = {"dtype": ST_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
        off += s.nbytes
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Open shards in order and accept tensors in exactly the planned order; ``close()`` writes the index."""

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards = plan_shards(specs, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self._order = [(si, s) for si, shard in enumerate(self.shards) for s in shard]
        self._pos = 0
        self._fh: Optional[BinaryIO] = None
        self._open_shard = -1
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        si, spec = self._order[self._pos]
        if name != spec.name or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"writer expected {spec.name} {list(spec.shape)}, got {name} {list(tensor.shape)}")
        if si != self._open_shard:
            self._start(si)
        t = tensor.detach().to(spec.dtype).contiguous()
        self._fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self.bytes_written += spec.nbytes
        self._pos += 1

    def _start(self, si: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(self.out_dir / self.names[si], "wb", buffering=8 << 20)
        self._fh.write(_header(self.shards[si], None))
        self._open_shard = si

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._pos != len(self._order):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._order)} tensors")
        if len(self.names) > 1:
            weight_map = {s.name: self.names[si] for si, s in self._order}
            total = sum(s.nbytes for _, s in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
