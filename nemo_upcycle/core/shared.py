"""Shared experts initialised from the dense MLP, with routed + shared = dense at step 0.

A shared expert (Megatron-core ``SharedExpertMLP``, ``megatron/core/transformer/moe/shared_experts.py``; HF
``Qwen2MoeSparseMoeBlock.shared_expert``) is one SwiGLU MLP every token visits; its output is added to the routed
experts', optionally times ``sigmoid(gate_weight . x)`` (``moe_shared_expert_gate``; HF Qwen2-MoE always has this
gate). Megatron sizes it as ``moe_shared_expert_intermediate_size``; here it is S x the routed expert size Fe = F / G
("S shared experts" fused into one MLP, as DeepSeek / Qwen2-MoE do).

Initialisation (ours; Megatron's upcycling leaves ``shared_experts.*`` at random init): the S slots of size Fe are
shards ``i mod G`` of the dense MLP (i = 0..S-1): whole copies at G = 1, shards at G > 1. Shard j of the dense MLP
appears m_j times in the shared expert. Each shard j with m_j > 0 is split half / half:

  shared:  down columns of shard j scaled by h / (m_j * gamma), h = 1/2, gamma = the gate's value at step 0
           (sigmoid(0) = 1/2 with the gate, whose weight starts at zero; 1 without a gate);
  routed:  the down projection of every routed expert cut from shard j scaled by (1 - h) on top of the usual
           granular factor (``UpcycleOptions.scale_factor``).

Routed experts cut from a shard no shared slot holds keep their factor. With renormalised routing the routed
experts compute sum_j (1 - h_j) shard_j(x) (``options.step0_report``) and the shared expert sum_j h_j shard_j(x),
so the sum is the dense MLP (SwiGLU acts per intermediate unit, the down projection is linear). With the gate at
zero, S = 1 and G = 1 the shared expert is the dense MLP unchanged and only the routed experts are halved.
Noise and Drop-Upcycling touch the routed experts only; the shared expert stays the dense function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

from nemo_upcycle.errors import FieldError

if TYPE_CHECKING:  # plain Python like options.py (which reads these rules); the tensor functions import torch lazily
    import torch

SHARE = 0.5  # h: the fraction of a shard's function the shared expert carries at step 0
GATE_AT_INIT = 0.5  # sigmoid(0): the shared-expert gate's value at step 0 (its weight starts at zero)


def shared_count(opts) -> int:
    return int(getattr(opts, "shared_experts", 0) or 0)


def shard_counts(opts) -> list[int]:
    """m_j: how many of the S shared slots hold shard j of the dense MLP (slot i holds shard i mod G)."""
    S, G = shared_count(opts), opts.granularity
    return [S // G + (1 if j < S % G else 0) for j in range(G)]


def gate_at_init(opts) -> float:
    """gamma: what multiplies the shared expert's output at step 0 in Megatron."""
    return GATE_AT_INIT if opts.moe_shared_expert_gate else 1.0


def routed_down_factor(opts, expert: int) -> float:
    """(1 - h_j) for the routed expert cut from shard j = expert mod G (1 without shared experts)."""
    if shared_count(opts) == 0:
        return 1.0
    return 1.0 - SHARE if shard_counts(opts)[expert % opts.granularity] else 1.0


def shared_intermediate_size(opts, ffn_hidden_size: int) -> int:
    """Megatron's ``moe_shared_expert_intermediate_size``: S x Fe (0 without shared experts)."""
    return shared_count(opts) * (ffn_hidden_size // opts.granularity)


def shared_from_size(size: Optional[int], ffn_hidden_size: int, granularity: int) -> int:
    """S from Megatron's ``moe_shared_expert_intermediate_size`` (None / 0: no shared expert); a size that is not a
    multiple of the routed expert size Fe = F / G is refused."""
    if not size:
        return 0
    Fe = ffn_hidden_size // granularity
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size % Fe:
        raise FieldError(f"{{shared_experts=}} (the shared expert's size) is not a multiple of the routed expert "
                         f"size {Fe} (dense FFN {ffn_hidden_size} / granularity {granularity}); choose S x {Fe}.",
                         shared_experts=size)
    return size // Fe


def validate_shared(opts) -> None:
    """Refuse a negative or non-integer S, and a gate without shared experts."""
    S = getattr(opts, "shared_experts", 0)
    if isinstance(S, bool) or not isinstance(S, int) or S < 0:
        raise FieldError("{shared_experts=} must be a whole number >= 0 (0: no shared expert).", shared_experts=S)
    gate = opts.moe_shared_expert_gate
    if not isinstance(gate, bool):
        raise FieldError("{moe_shared_expert_gate=} must be true or false.", moe_shared_expert_gate=gate)
    if gate and S == 0:
        raise FieldError("{moe_shared_expert_gate} needs shared experts ({shared_experts} = 0): set {shared_experts} "
                         "or drop {moe_shared_expert_gate}.", moe_shared_expert_gate=gate, shared_experts=S)


def shared_note(opts) -> str:
    """What the shared expert adds to the step-0 note (empty without shared experts)."""
    S = shared_count(opts)
    if S == 0:
        return ""
    gate = " behind a zero-initialised sigmoid gate (1/2 at step 0)" if opts.moe_shared_expert_gate else ""
    return (f" {S} shared expert slot(s) from the dense MLP{gate} carry half of each shard they hold, the routed "
            "experts cut from those shards the other half.")


# ---------------------------------------------------------------------------------------------- tensors
class SharedWeights(NamedTuple):
    gate: "torch.Tensor"  # [S*Fe, D]  (HF shared_expert.gate_proj; Megatron fc1 first half)
    up: "torch.Tensor"  # [S*Fe, D]    (HF shared_expert.up_proj; Megatron fc1 second half)
    down: "torch.Tensor"  # [D, S*Fe]  (HF shared_expert.down_proj; Megatron fc2)


def shared_expert_weights(gate_FD: "torch.Tensor", up_FD: "torch.Tensor", down_DF: "torch.Tensor",
                          opts, gamma: Optional[float] = None):
    """The shared expert as one MLP of S x Fe units; ``gamma`` overrides the gate's step-0 value (an HF Qwen2-MoE
    always has the gate: 1/2)."""
    import torch

    F, G, S = gate_FD.shape[0], opts.granularity, shared_count(opts)
    Fe = F // G
    counts = shard_counts(opts)
    g = gate_at_init(opts) if gamma is None else gamma
    gates, ups, downs = [gate_FD[:0]], [up_FD[:0]], [down_DF[:, :0]]  # S = 0: an empty MLP that adds exactly 0
    for i in range(S):
        j = i % G
        sl = slice(j * Fe, (j + 1) * Fe)
        gates.append(gate_FD[sl])
        ups.append(up_FD[sl])
        downs.append((down_DF[:, sl].float() * (SHARE / (counts[j] * g))).to(down_DF.dtype))
    return SharedWeights(torch.cat(gates), torch.cat(ups), torch.cat(downs, dim=1))


def shared_gate_weight(hidden_size: int, dtype=None) -> "torch.Tensor":
    """The shared-expert gate [1, D] at step 0: zero, so sigmoid gives exactly 1/2."""
    import torch

    return torch.zeros(1, hidden_size, dtype=dtype or torch.float32)
