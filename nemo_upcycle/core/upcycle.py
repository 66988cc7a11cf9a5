"""The upcycling transforms on plain tensors: dense MLP -> E experts, plus a new router.

Shapes (HF / torch Linear layout, out x in):  D = hidden, F = dense FFN, Fe = F / G expert FFN.
  gate_FD, up_FD   [F, D]    dense SwiGLU input projections (Megatron fc1 = cat(gate, up))
  down_DF          [D, F]    dense output projection (Megatron fc2)
  expert e = shard j of copy i, with e = i * G + j (Megatron ``upcycling_utils`` order):
  gate_FeD = gate_FD[j*Fe:(j+1)*Fe], down_DFe = down_DF[:, j*Fe:(j+1)*Fe]

Every random draw is seeded by (seed, layer, expert, purpose) so results do not depend on the order
in which layers are produced, or on which rank produces them (each expert-parallel rank can build
only its own experts and get the same numbers).

References: Komatsuzaki et al. (arXiv 2212.05055), He et al. (arXiv 2410.07524),
Nakamura et al. Drop-Upcycling (arXiv 2502.19261).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Optional

import torch

from nemo_upcycle.core.options import UpcycleOptions
from nemo_upcycle.core.shared import routed_down_factor
from nemo_upcycle.core.split import units_of

_PURPOSE = {"router": 0, "noise": 1, "drop": 2}


def generator(seed: int, layer: int, expert: int, purpose: str) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, layer, expert, purpose)."""
    digest = hashlib.sha256(f"{seed}/{layer}/{expert}/{_PURPOSE[purpose]}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class ExpertWeights(NamedTuple):
    gate: torch.Tensor  # [Fe, D]  (HF Mixtral w1)
    up: torch.Tensor  # [Fe, D]    (HF Mixtral w3)
    down: torch.Tensor  # [D, Fe]  (HF Mixtral w2)


def scaling_exponents(opts: UpcycleOptions, gated: bool = True) -> tuple[float, float, float]:
    """Multipliers for (gate, up, down) of every expert, from the factor s and the scaling mode."""
    s = opts.scale_factor()
    if s == 1.0:
        return 1.0, 1.0, 1.0
    if opts.scaling == "exact":
        return 1.0, 1.0, s  # down is linear in its input: the whole factor lands on the output
    if gated:  # megatron: three matrices share the factor
        r = s ** (1.0 / 3.0)
        return r, r, r
    r = s ** 0.5
    return r, 1.0, r


def expert_weights(
    gate_FD: torch.Tensor,
    up_FD: torch.Tensor,
    down_DF: torch.Tensor,
    opts: UpcycleOptions,
    layer: int,
    expert: int,
    *,
    gated: bool = True,
    units: Optional[torch.Tensor] = None,
) -> ExpertWeights:
    """Build one expert from the dense MLP. Without noise/drop/scaling the result shares storage with the input.

    ``units``: the dense intermediate units this expert holds (``core.plan.UpcyclePlan.units``: a split other than
    contiguous); None: the contiguous slice j of shard j."""
    F = gate_FD.shape[0]
    G = opts.granularity
    Fe = F // G
    j = expert % G
    if units is not None:
        gate, up, down = gate_FD[units], up_FD[units], down_DF[:, units]
    else:
        gate, up, down = gate_FD[j * Fe:(j + 1) * Fe], up_FD[j * Fe:(j + 1) * Fe], down_DF[:, j * Fe:(j + 1) * Fe]

    sg, su, sd = scaling_exponents(opts, gated)
    sd *= routed_down_factor(opts, expert)  # shared experts carry part of the shard (core.shared)
    if opts.drop_ratio > 0:
        gate, up, down = _drop_upcycle(gate, up, down, gate_FD, up_FD, down_DF, opts, layer, expert)
    if opts.noise_std > 0:
        g = generator(opts.seed, layer, expert, "noise")
        gate, up, down = (_add_noise(t, opts.noise_std, g) for t in (gate, up, down))
    return ExpertWeights(_scaled(gate, sg), _scaled(up, su), _scaled(down, sd))


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    if s == 1.0:
        return t
    return (t.float() * s).to(t.dtype)


def _add_noise(t: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * std
    return (t.float() + noise).to(t.dtype)


def _drop_upcycle(gate, up, down, gate_FD, up_FD, down_DF, opts: UpcycleOptions, layer: int, expert: int):
    """Re-initialize a seeded random fraction r of this expert's intermediate units.

    A unit u is row u of gate and up and column u of down; its new values are drawn from
    N(mean, std) of the *original dense* tensor (Drop-Upcycling, Sec. 3). Each expert draws its own units.
    """
    Fe = gate.shape[0]
    n_drop = int(round(opts.drop_ratio * Fe))
    if n_drop == 0:
        return gate, up, down
    g = generator(opts.seed, layer, expert, "drop")
    units = torch.randperm(Fe, generator=g)[:n_drop]
    out = []
    for t, full, dim in ((gate, gate_FD, 0), (up, up_FD, 0), (down, down_DF, 1)):
        full32 = full.float()
        mean, std = full32.mean().item(), full32.std().item()
        t = t.clone()
        shape = (n_drop, t.shape[1]) if dim == 0 else (t.shape[0], n_drop)
        fresh = (torch.randn(shape, generator=g, dtype=torch.float32) * std + mean).to(t.dtype)
        if dim == 0:
            t[units] = fresh
        else:
            t[:, units] = fresh
        out.append(t)
    return tuple(out)


def router_weight(hidden_size: int, opts: UpcycleOptions, layer: int, dtype: torch.dtype = torch.float32,
                  base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The new router [E, D].

    normal:        N(0, router_std), seeded per layer (Megatron's init method for the router).
    zeros:         all zero; the first top-k choices then depend on tie-breaking.
    virtual_group: the first E/G rows of a normal router, each repeated G times consecutively, so the
                   G shards of one copy share a row (He et al. Sec. 3.2; Megatron ``upcycling_utils``).
    ``base`` replaces the random draw (e.g. a router a Megatron model already initialized).
    """
    E, G = opts.num_moe_experts, opts.granularity
    kind = opts.router_init_resolved
    if kind == "zeros":
        return torch.zeros(E, hidden_size, dtype=dtype)
    if base is None:
        base = torch.randn(E, hidden_size, generator=generator(opts.seed, layer, 0, "router")) * opts.router_std
    if kind == "virtual_group":
        base = base[: E // G].repeat_interleave(G, dim=0)
    return base.to(dtype)


class LayerExperts:
    """Experts of one layer at a time, reading each dense MLP once: ``experts.get(layer, e)``.

    ``read_mlp(layer)`` returns the dense (gate_FD, up_FD, down_DF); it is called once per layer, and the
    previous layer's tensors are dropped, so memory stays at one dense MLP plus one expert. Used by the HF
    conversion (all experts) and by online upcycling (each expert-parallel rank asks only for its own).
    """

    def __init__(self, read_mlp, opts: UpcycleOptions, *, gated: bool = True, plan=None):
        self.read_mlp, self.opts, self.gated = read_mlp, opts, gated
        self.perms = plan.perms if plan is not None else {}  # a ``core.plan.UpcyclePlan``'s unit permutations
        self._layer: Optional[int] = None
        self._dense: tuple = ()
        self._last: tuple[Optional[int], Optional[ExpertWeights]] = (None, None)

    def dense(self, layer: int) -> tuple:
        """The dense (gate_FD, up_FD, down_DF) of ``layer`` (read once; the shared expert is made from it)."""
        if layer != self._layer:
            self._dense, self._last = (), (None, None)  # drop the old layer before reading the new one
            self._dense, self._layer = tuple(self.read_mlp(layer)), layer
        return self._dense

    def get(self, layer: int, expert: int) -> ExpertWeights:
        self.dense(layer)
        if self._last[0] != expert:
            units = units_of(self.opts, layer, expert, self._dense[0].shape[0], self.perms)
            self._last = (expert, expert_weights(*self._dense, self.opts, layer, expert, gated=self.gated,
                                                 units=units))
        return self._last[1]
