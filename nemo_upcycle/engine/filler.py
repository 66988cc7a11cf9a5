"""Dense HF Llama tensors -> the parameters of one rank of a Megatron-core MoE GPT model.

Pure PyTorch (no Megatron import): given a parameter name from ``module.named_parameters()`` on a rank (local or
Transformer Engine spec), return that rank's shard. Which HF tensors a parameter holds, how they are joined and
split is the key table's (``formats.keymap``); the MoE tensors (router, experts, shared expert) come from ``core``,
as for the HF conversion. Local expert j on expert-parallel rank r is global expert r * E_local + j; local layer l on
a pipeline stage is global layer ``layer_offset + l``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.core.plan import UpcyclePlan
from nemo_upcycle.core.shared import shared_expert_weights, shared_gate_weight
from nemo_upcycle.core.upcycle import LayerExperts
from nemo_upcycle.formats.base import read_dense_mlp
from nemo_upcycle.formats.keymap import FILL_KEYMAP, HFTensor, KeyMap, Sizes, hf_values


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


class MegatronFiller:
    """Produce each rank-local Megatron parameter from a dense source (anything with ``get(hf_key)``)."""

    def __init__(self, get: Callable[[str], torch.Tensor], llama: dict, opts: UpcycleOptions, layout: RankLayout,
                 num_local_experts: int, padded_vocab: Optional[int] = None, keymap: KeyMap = FILL_KEYMAP,
                 plan: Optional[UpcyclePlan] = None, experts=None):
        self.get, self.cfg, self.opts, self.par, self.keymap = get, llama, opts, layout, keymap
        self.num_local_experts = num_local_experts
        self.sizes = Sizes.of(hf_values(llama, rope=False), padded_vocab)
        self.tied = bool(llama.get("tie_word_embeddings", False))
        self.plan = plan if plan is not None else UpcyclePlan()  # splits and routers learnt from data (core.plan)
        # ``experts``: anything with get(layer, expert), e.g. core.sources.MultiSourceExperts (several dense sources)
        self.experts = experts or LayerExperts(lambda layer: read_dense_mlp(get, layer), opts, plan=self.plan)

    def _hf(self, t: HFTensor, layer: Optional[int], expert: Optional[int]) -> torch.Tensor:
        if t.made_from is None:
            return self.get(t.key(layer, expert))
        if t.made_from == "router":
            return self.plan.router(self.cfg["hidden_size"], self.opts, layer)
        if t.made_from == "shared_expert_gate":  # Megatron's gate_weight: zero, sigmoid = 1/2 (core.shared)
            return shared_gate_weight(self.cfg["hidden_size"])
        if t.made_from.startswith("shared_"):
            w = shared_expert_weights(*self.experts.dense(layer), self.opts)
            return getattr(w, t.made_from.removeprefix("shared_"))
        return getattr(self.experts.get(layer, expert), t.made_from)

    def tensor(self, name: str) -> Optional[torch.Tensor]:
        """The local shard for Megatron parameter ``name``; None for state that is not a weight (``_extra_state``)."""
        if name.endswith("_extra_state"):
            return None
        try:
            hit = self.keymap.megatron(name)
        except KeyError:
            raise KeyError(f"no dense source for Megatron parameter {name}") from None
        p, row = self.par, hit.row
        layer = None if hit.layer is None else p.layer_offset + hit.layer
        expert = None if hit.expert is None else p.ep_rank * self.num_local_experts + hit.expert
        hf = (row.tied,) if row.tied is not None and self.tied else row.hf
        rank, size = (p.etp_rank, p.etp_size) if row.group == "etp" else (p.tp_rank, p.tp_size)
        return row.to_megatron([self._hf(t, layer, expert) for t in hf], self.sizes, rank, size)

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
