"""How close a MoE made from several dense sources (``core.sources``) is to each of them.

Such a MoE is none of its sources (its experts come from different models, its attention from the base or their
average), so ``verify`` reports instead, for each source i: transformers' Mixtral with every sparse block routed only
among the experts cut from source i (the other experts' logits set to -inf before the recorded routing,
``core.routing.route``), against that source's own ``LlamaForCausalLM``: max / mean |logit difference| and top-1
agreement. With attention from the base and sources that share it (fine-tuned MLPs), the restricted MoE computes
source i exactly; otherwise the difference measures what the shared attention changed.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

from nemo_upcycle.core.routing import route


def source_experts(num_experts: int, granularity: int, n: int, i: int) -> torch.Tensor:
    """Mask [E]: the experts cut from source i (``core.sources.source_of``: copy e // G, source copy mod n)."""
    return torch.tensor([(e // granularity) % n == i for e in range(num_experts)])


def restrict(model, allowed: torch.Tensor) -> None:
    """Route every sparse block of an HF Mixtral only among ``allowed`` experts, with its recorded routing."""
    rec = getattr(model.config, "upcycling", None) or {}
    score, pre = rec.get("moe_router_score_function", "softmax"), bool(rec.get("moe_router_pre_softmax", False))
    renorm = rec.get("norm_topk_prob", True)

    def forward(self, hidden_states: torch.Tensor):
        B, T, D = hidden_states.shape
        x = hidden_states.view(-1, D)
        logits = self.gate(x).masked_fill(~allowed, float("-inf"))
        probs, indices = route(logits, self.top_k, score, pre, renorm)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero(indices == e, as_tuple=True)
            if tok.numel() and allowed[e]:
                out.index_add_(0, tok, expert(x[tok]) * probs[tok, slot, None].to(x.dtype))
        return out.view(B, T, D), logits

    for module in model.modules():
        if module.__class__.__name__ == "MixtralSparseMoeBlock":
            module.forward = types.MethodType(forward, module)


@torch.no_grad()
def per_source(moe_path: Path, ids: torch.Tensor, load_moe, load_dense, logit_stats) -> list[dict]:
    """One record per expert source named in the MoE's ``upcycling`` record (module docstring); the loaders and
    ``logit_stats`` are ``offline.verify``'s."""
    moe = load_moe(moe_path)
    rec = getattr(moe.config, "upcycling", None) or {}
    sources = rec.get("expert_sources") or []
    out = []
    for i, path in enumerate(sources):
        restrict(moe, source_experts(moe.config.num_local_experts, rec.get("granularity", 1), len(sources), i))
        mx, mean, top1 = logit_stats(load_dense(path)(ids).logits, moe(ids).logits)
        out.append({"source": str(path), "index": i, "max_abs": mx, "mean_abs": mean, "top1": top1})
    return out
