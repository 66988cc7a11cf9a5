"""One MoE layer's split and router from the dense layer's activations on calibration tokens (``data.calibration``).

Streaming over the tokens in chunks: the [tokens, F] intermediate activations are never held whole; the clustering
split keeps the activations of the first ``cluster_tokens`` tokens ([F, cluster_tokens]). Every statistic is also
recorded next to its baseline, so a report can say what the data changed:
  importance_balance        max / min of the experts' summed importance (contiguous: ``..._contiguous``)
  coactivation              within-expert minus across-expert unit correlation (``core.split.group_coactivation``)
  load_imbalance            max / mean expert load of the first step on the calibration tokens, the data router
                            against a ``normal`` router of the same seed (``load_imbalance_normal``)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from nemo_upcycle.core import router_init as ri
from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.core.split import (
    cluster_permutation,
    group_coactivation,
    importance_balance,
    importance_permutation,
)
from nemo_upcycle.data.dense_pass import LayerInput, mlp_activation


def _chunks(x: torch.Tensor, n: int):
    for i in range(0, x.shape[0], n):
        yield x[i:i + n]


def mean_abs_activation(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-unit mean |silu(gate x) * up x| over the rows of x [F]."""
    total = torch.zeros(gate.shape[0], dtype=torch.float64)
    for c in _chunks(x, chunk):
        total += mlp_activation(c, gate, up).abs().double().sum(0)
    return total / max(x.shape[0], 1)


def group_share(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, perm: torch.Tensor, G: int,
                chunk: int) -> torch.Tensor:
    """[T, G]: each token's fraction of the layer's |activation| mass in each expert's units."""
    label = torch.empty(gate.shape[0], dtype=torch.long)
    for j, u in enumerate(perm.chunk(G)):
        label[u] = j
    out = []
    for c in _chunks(x, chunk):
        a = mlp_activation(c, gate, up).abs().double()
        m = torch.zeros(a.shape[0], G, dtype=torch.float64).index_add_(1, label, a)
        out.append(m / m.sum(1, keepdim=True).clamp_min(1e-30))
    return torch.cat(out)


@torch.no_grad()
def layer_plan(li: LayerInput, opts: UpcycleOptions, n_cal: int, prompt_sizes: Sequence[int], cluster_tokens: int,
               chunk: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], dict]:
    """(perm [R, F] or None, router [E, D] or None, record) for one layer (module docstring)."""
    E, G, R = opts.num_moe_experts, opts.granularity, opts.copies
    F = li.gate.shape[0]
    X = li.x[:n_cal]
    rec: dict = {}
    perm = None
    contiguous = torch.arange(F)
    if opts.expert_split == "importance":
        imp = mean_abs_activation(X, li.gate, li.up, chunk)
        perm = importance_permutation(imp, G)
        rec["importance_balance"] = importance_balance(imp, perm, G)
        rec["importance_balance_contiguous"] = importance_balance(imp, contiguous, G)
    elif opts.expert_split == "clustering":
        feats = mlp_activation(X[:cluster_tokens], li.gate, li.up).T.contiguous()
        perm = cluster_permutation(feats, G, opts.seed, li.layer)
        rec["coactivation"] = group_coactivation(feats, perm, G)
        rec["coactivation_contiguous"] = group_coactivation(feats, contiguous, G)
    router = None
    kind = opts.router_init_resolved
    if kind == "kmeans" and opts.expert_split == "clustering" and G > 1:
        share = group_share(X, li.gate, li.up, perm, G, chunk)
        router = ri.clustered_router(X, share, E, G, opts.router_std, opts.seed, li.layer)
    elif kind == "kmeans":
        router = ri.kmeans_router(X, E, G, opts.router_std, opts.seed, li.layer)
    elif kind == "hidden":
        means, start = [], n_cal
        for n in prompt_sizes:
            means.append(ri.unit_rows(li.x[start:start + n]).mean(0))
            start += n
        router = ri.hidden_router(torch.stack(means), X if n_cal else li.x[n_cal:], G, opts.router_std)
    if router is not None and n_cal:
        from nemo_upcycle.core.upcycle import router_weight

        k = opts.moe_router_topk
        normal = router_weight(X.shape[1], _normal(opts), li.layer)
        rec["load_imbalance"] = ri.load_imbalance(ri.expert_load(X, router, k))
        rec["load_imbalance_normal"] = ri.load_imbalance(ri.expert_load(X, normal, k))
        rec["load"] = [round(v, 5) for v in ri.expert_load(X, router, k).tolist()]
    return (None if perm is None else perm.expand(R, F).clone()), router, rec


def _normal(opts: UpcycleOptions) -> UpcycleOptions:
    import dataclasses

    return dataclasses.replace(opts, router_init="virtual_group" if opts.granularity > 1 else "normal",
                               expert_split="contiguous")
