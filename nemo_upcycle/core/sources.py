"""Experts from several dense models of one architecture (Branch-Train-MiX, Sukhbaatar et al., arXiv 2403.07816;
mergekit-moe's main use): copy i of every MoE layer is cut from the MLP of source ``i mod n``; attention, norms and
embeddings come from the base model or are the element-wise mean of the expert sources (BTX averages them).

``source_of`` says which source an expert comes from; ``MultiSourceExperts`` builds each expert from its source's MLP
(one ``core.upcycle.LayerExperts`` per source, so memory holds at most one MLP layer per source); ``average``
is the mean of the sources' tensors for one key, in fp32, cast back to the first one's dtype.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.core.upcycle import ExpertWeights, LayerExperts


def source_of(opts: UpcycleOptions, expert: int, n: int) -> int:
    """The index of the source expert ``expert`` is cut from: its copy (expert // G) mod n."""
    return (expert // opts.granularity) % n


def experts_of(opts: UpcycleOptions, source: int, n: int) -> list[int]:
    """Every expert cut from ``source``."""
    return [e for e in range(opts.num_moe_experts) if source_of(opts, e, n) == source]


class MultiSourceExperts:
    """``get(layer, expert)`` like ``LayerExperts``, each expert from its own source's ``read_mlp``."""

    def __init__(self, reads: Sequence[Callable], opts: UpcycleOptions, *, plan=None, gated: bool = True):
        self.opts = opts
        self.parts = [LayerExperts(r, opts, plan=plan, gated=gated) for r in reads]

    def get(self, layer: int, expert: int) -> ExpertWeights:
        return self.parts[source_of(self.opts, expert, len(self.parts))].get(layer, expert)


def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean (fp32 accumulation), in the first tensor's dtype."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for t in tensors:
        acc += t.float()
    return (acc / len(tensors)).to(tensors[0].dtype)
