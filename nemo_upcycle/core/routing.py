"""Routing semantics as plain torch, the way Megatron-core's ``topk_softmax_with_capacity`` defines them.

Vocabulary (Megatron's): ``logits`` [T, E] = x @ router^T; ``probs`` [T, k] the routing weights of the
kept experts; ``indices`` [T, k] which experts.

- top-k then softmax (default; equal to HF Mixtral's softmax -> top-k -> renormalize): weights sum to 1.
- softmax then top-k (``pre_softmax``): weights are the k largest of a softmax over E; renormalized
  only when ``renormalize`` (HF ``norm_topk_prob``).
- sigmoid: sigmoid scores, top-k, divided by their sum when ``renormalize``.

``moe_mlp`` is a dense reference MoE forward (every token through its k experts, no capacity), used by
``verify`` to give an HF Mixtral checkpoint the routing recorded in its config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(logits_TE: torch.Tensor, topk: int, score_function: str = "softmax", pre_softmax: bool = False,
          renormalize: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (probs_TK, indices_TK) for router logits [T, E]."""
    logits = logits_TE.float()
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        probs, indices = torch.topk(scores, topk, dim=-1)
        if renormalize if renormalize is not None else topk > 1:
            probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
        return probs, indices
    if score_function != "softmax":
        raise ValueError(f"unknown score function {score_function!r}")
    if pre_softmax:
        probs, indices = torch.topk(torch.softmax(logits, dim=-1), topk, dim=-1)
        if renormalize:
            probs = probs / probs.sum(-1, keepdim=True)
        return probs, indices
    top, indices = torch.topk(logits, topk, dim=-1)
    return torch.softmax(top, dim=-1), indices


def swiglu_expert(x_TD: torch.Tensor, gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x): the Llama / Mixtral expert."""
    return F.linear(F.silu(F.linear(x_TD, gate_FD)) * F.linear(x_TD, up_FD), down_DF)


def moe_mlp(x_TD: torch.Tensor, router_ED: torch.Tensor, experts, topk: int, **routing) -> torch.Tensor:
    """Reference sparse MoE: out_t = sum_k probs[t,k] * expert_{indices[t,k]}(x_t). ``experts``: (gate, up, down) list."""
    probs, indices = route(F.linear(x_TD, router_ED), topk, **routing)
    out = torch.zeros_like(x_TD)
    for e, (g, u, d) in enumerate(experts):
        tok, slot = torch.nonzero(indices == e, as_tuple=True)
        if tok.numel():
            y = swiglu_expert(x_TD[tok], g, u, d) * probs[tok, slot, None].to(x_TD.dtype)
            out.index_add_(0, tok, y)
    return out
