"""Dense HF Llama tensors -> the parameters of one rank of a Megatron-core MoE GPT model.

Pure PyTorch (no Megatron import): given a parameter name from ``module.named_parameters()`` on a rank,
return that rank's shard. Names are Megatron's, for both the local spec and the Transformer Engine spec:

  embedding.word_embeddings.weight                      embed_tokens            vocab-parallel, dim 0
  decoder.layers.{l}.input_layernorm.weight             input_layernorm         (TE: linear_qkv.layer_norm_weight)
  decoder.layers.{l}.self_attention.linear_qkv.weight   merge(q, k, v)          column-parallel, dim 0
  decoder.layers.{l}.self_attention.linear_proj.weight  o_proj                  row-parallel, dim 1
  decoder.layers.{l}.pre_mlp_layernorm.weight           post_attention_layernorm (TE: mlp.linear_fc1.layer_norm_weight)
  decoder.layers.{l}.mlp.router.weight                  new router (core.router_weight), replicated
  ...mlp.experts.local_experts.{j}.linear_fc1.weight    cat(gate_e, up_e)       expert-tensor-parallel per half
  ...mlp.experts.local_experts.{j}.linear_fc2.weight    down_e                  expert-tensor-parallel, dim 1
     (TE grouped GEMM: mlp.experts.linear_fc1.weight{j} / linear_fc2.weight{j})
  decoder.layers.{l}.mlp.linear_fc1.weight / linear_fc2  a dense layer (moe_layer_freq) kept dense
  decoder.final_layernorm.weight                        norm
  output_layer.weight                                   lm_head (embed_tokens when tied)

Local expert j on expert-parallel rank r is global expert r * E_local + j; local layer l on a pipeline stage
is global layer ``layer_offset + l``. The q/k/v merge follows Megatron's grouped layout: for each query
group, its q heads, then its k head, then its v head (as NeMo's ``merge_qkv`` transform does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.core.upcycle import LayerExperts, router_weight
from nemo_upcycle.formats.base import read_dense_mlp


@dataclass(frozen=True)
class RankLayout:
    """Where this rank sits: tensor / expert / expert-tensor parallel ranks and its first global layer."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    layer_offset: int = 0


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
    """Inverse of ``merge_qkv`` (for reading a Megatron dense checkpoint back into HF names)."""
    D = qkv.shape[1]
    per = num_heads // num_groups
    hd = qkv.shape[0] // (num_heads + 2 * num_groups)
    g = qkv.view(num_groups, (per + 2) * hd, D)
    q, k, v = g.split([per * hd, hd, hd], dim=1)
    return q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)


def shard(t: torch.Tensor, rank: int, size: int, dim: int) -> torch.Tensor:
    if size == 1:
        return t
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split into {size} parallel shards")
    return t.chunk(size, dim=dim)[rank]


def glu_fc1(gate: torch.Tensor, up: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Megatron's gated fc1 on one tensor-parallel rank: [gate shard; up shard]."""
    return torch.cat([shard(gate, rank, size, 0), shard(up, rank, size, 0)], dim=0)


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))")


class MegatronFiller:
    """Produce each rank-local Megatron parameter from a dense source (anything with ``get(hf_key)``)."""

    def __init__(self, get: Callable[[str], torch.Tensor], llama: dict, opts: UpcycleOptions, layout: RankLayout,
                 num_local_experts: int, padded_vocab: Optional[int] = None):
        self.get, self.cfg, self.opts, self.par = get, llama, opts, layout
        self.num_local_experts = num_local_experts
        self.padded_vocab = padded_vocab or llama["vocab_size"]
        self.experts = LayerExperts(lambda layer: read_dense_mlp(get, layer), opts)

    def _vocab(self, key: str) -> torch.Tensor:
        t = self.get(key)
        if self.padded_vocab > t.shape[0]:  # padded rows are never looked up; zero logits for them
            t = torch.cat([t, t.new_zeros(self.padded_vocab - t.shape[0], t.shape[1])])
        return shard(t, self.par.tp_rank, self.par.tp_size, 0)

    def tensor(self, name: str) -> Optional[torch.Tensor]:
        """The local shard for Megatron parameter ``name``; None for state that is not a weight (``_extra_state``)."""
        p = self.par
        if name.endswith("_extra_state"):
            return None
        if name == "embedding.word_embeddings.weight":
            return self._vocab("model.embed_tokens.weight")
        if name == "output_layer.weight":
            tied = self.cfg.get("tie_word_embeddings", False)
            return self._vocab("model.embed_tokens.weight" if tied else "lm_head.weight")
        if name == "decoder.final_layernorm.weight":
            return self.get("model.norm.weight")
        m = _LAYER.fullmatch(name)
        if not m:
            raise KeyError(f"no dense source for Megatron parameter {name}")
        layer, rest = p.layer_offset + int(m.group(1)), m.group(2)
        hf = f"model.layers.{layer}."
        if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
            return self.get(hf + "input_layernorm.weight")
        if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
            return self.get(hf + "post_attention_layernorm.weight")
        if rest == "self_attention.linear_qkv.weight":
            H = self.cfg["num_attention_heads"]
            qkv = merge_qkv(*(self.get(hf + f"self_attn.{x}_proj.weight") for x in "qkv"), H,
                            self.cfg.get("num_key_value_heads") or H)
            return shard(qkv, p.tp_rank, p.tp_size, 0)
        if rest == "self_attention.linear_proj.weight":
            return shard(self.get(hf + "self_attn.o_proj.weight"), p.tp_rank, p.tp_size, 1)
        if rest == "mlp.router.weight":
            return router_weight(self.cfg["hidden_size"], self.opts, layer)
        if rest == "mlp.linear_fc1.weight":  # a layer that stays dense
            return glu_fc1(self.get(hf + "mlp.gate_proj.weight"), self.get(hf + "mlp.up_proj.weight"), p.tp_rank, p.tp_size)
        if rest == "mlp.linear_fc2.weight":
            return shard(self.get(hf + "mlp.down_proj.weight"), p.tp_rank, p.tp_size, 1)
        e = _EXPERT.fullmatch(rest)
        if e:
            local, which = (int(e.group(1)), e.group(2)) if e.group(1) is not None else (int(e.group(4)), e.group(3))
            w = self.experts.get(layer, p.ep_rank * self.num_local_experts + local)
            if which == "linear_fc1":
                return glu_fc1(w.gate, w.up, p.etp_rank, p.etp_size)
            return shard(w.down, p.etp_rank, p.etp_size, 1)
        raise KeyError(f"no dense source for Megatron parameter {name}")

    @torch.no_grad()
    def fill(self, named_params, progress: Optional[Callable[[int], None]] = None) -> int:
        """Copy every parameter's shard into place (shape-checked); return the number of elements written."""
        n = 0
        for name, param in named_params:
            t = self.tensor(name)
            if t is None:
                continue
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"{name}: dense source gives {list(t.shape)}, the model has {list(param.shape)}")
            param.data.copy_(t.to(param.dtype))
            n += param.numel()
            if progress:
                progress(param.numel())
        return n
