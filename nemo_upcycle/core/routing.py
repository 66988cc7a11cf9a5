"""Routing semantics as plain torch, the way Megatron-core's ``topk_softmax_with_capacity`` defines them.

Vocabulary (Megatron's): ``logits`` [T, E] = x @ router^T; ``probs`` [T, k] the routing weights of the
kept experts; ``indices`` [T, k] which experts.

- top-k then softmax (default; equal to HF Mixtral's softmax -> top-k -> renormalize): weights sum to 1.
- softmax then top-k (``pre_softmax``): weights are the k largest of a softmax over E; renormalized
  only when ``renormalize`` (HF ``norm_topk_prob``).
- sigmoid: sigmoid scores, top-k, divided by their sum when ``renormalize``.

``offline.verify`` gives an HF Mixtral checkpoint the routing recorded in its config with ``route``.
"""

from __future__ import annotations

import torch


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
