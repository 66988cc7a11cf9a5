"""The key table's tensor transforms (``formats.keymap`` rows name them): HF tensors <-> one Megatron tensor, and the
tensor- / expert-tensor-parallel shard of it. ``qkv`` groups q, k, v per query group as NeMo's
``TransformFns.merge_qkv`` (nemo/lightning/io/state.py); ``glu`` is Megatron's gated fc1 [gate; up], each half split
per rank; ``qkv_bias`` the same grouping for Qwen2's q/k/v biases (Megatron ``add_qkv_bias``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF q [H*hd, D], k/v [G*hd, D] -> Megatron linear_qkv [(H + 2G)*hd, D], grouped per query group."""
    hd = q.shape[0] // num_heads
    per = num_heads // num_groups
    D = q.shape[1]
    q = q.view(num_groups, per * hd, D)
    k = k.view(num_groups, hd, D)
    v = v.view(num_groups, hd, D)
    return torch.cat([q, k, v], dim=1).reshape(-1, D)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``merge_qkv``."""
    D = qkv.shape[1]
    per = num_heads // num_groups
    hd = qkv.shape[0] // (num_heads + 2 * num_groups)
    g = qkv.view(num_groups, (per + 2) * hd, D)
    q, k, v = g.split([per * hd, hd, hd], dim=1)
    return q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)


def shard(t: torch.Tensor, rank: int, size: int, dim: int) -> torch.Tensor:
    """Parallel shard ``rank`` of ``size`` along ``dim``."""
    if size == 1:
        return t
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split into {size} parallel shards")
    return t.chunk(size, dim=dim)[rank]


def glu_fc1(gate: torch.Tensor, up: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Megatron's gated fc1 on one tensor-parallel rank: [gate shard; up shard]."""
    return torch.cat([shard(gate, rank, size, 0), shard(up, rank, size, 0)], dim=0)


@dataclass(frozen=True)
class Sizes:
    """What the transforms need: heads and query groups (qkv), the HF and the padded Megatron vocabulary."""

    heads: int
    groups: int
    vocab: int
    padded_vocab: int

    @classmethod
    def of(cls, values: dict, padded_vocab: Optional[int] = None) -> "Sizes":
        """From config values under Megatron names (``hf_values``, ``megatron_values``)."""
        V = values["vocab_size"]
        return cls(values["num_attention_heads"], values["num_query_groups"], V, padded_vocab or V)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    # padded rows are never looked up; they give zero logits
    return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])]) if rows > t.shape[0] else t


# name -> (number of HF tensors, HF tensors -> the whole Megatron tensor, the whole Megatron tensor -> HF tensors)
TRANSFORMS: dict[str, tuple[int, Callable, Callable]] = {
    "copy": (1, lambda p, s: p[0], lambda t, s: (t,)),
    "vocab": (1, lambda p, s: _pad_rows(p[0], s.padded_vocab), lambda t, s: (t[: s.vocab],)),
    "qkv": (3, lambda p, s: merge_qkv(*p, s.heads, s.groups), lambda t, s: split_qkv(t, s.heads, s.groups)),
    "glu": (2, lambda p, s: torch.cat(p), lambda t, s: tuple(t.chunk(2))),
    # q/k/v biases [H*hd], [G*hd], [G*hd] <-> linear_qkv.bias, grouped as the weight rows are
    "qkv_bias": (3, lambda p, s: merge_qkv(*(b[:, None] for b in p), s.heads, s.groups)[:, 0],
                 lambda t, s: tuple(b[:, 0] for b in split_qkv(t[:, None], s.heads, s.groups))),
}
