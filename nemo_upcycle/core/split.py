"""How a copy's intermediate units are split into its G experts: a permutation of the F units, cut in G slices.

A unit u of the dense SwiGLU MLP is row u of gate and up and column u of down; the MLP is the sum of its units'
outputs, so any partition of the units into G experts sums back to the dense MLP. With the virtual-group router
(the G experts of a copy share a row) and the factor G on the down projection, step 0 is exact whatever the
permutation (``core.options.step0_report``). Expert j of copy i holds units ``perm[i][j*Fe:(j+1)*Fe]``, each slice in
ascending unit order.

  contiguous  the identity (Megatron-core ``upcycling_utils``; He et al., arXiv 2410.07524);
  random      a seeded permutation per (layer, copy) (LLaMA-MoE "random split", Zhu et al., arXiv 2406.16554);
  importance  units ranked by mean |activation| on calibration text, then dealt in snake order (ranks 0..G-1 to
              experts 0..G-1, ranks G..2G-1 to experts G-1..0, ...), so every expert gets the same number of units
              and an equal share of the important ones: the per-expert importance sums differ by at most the spread
              of one round (LLaMA-MoE's importance statistics; MoE Jetpack's "checkpoint recycling", arXiv 2406.04801);
  clustering  units grouped by co-activation: balanced spherical k-means on each unit's activation pattern over
              calibration tokens (centred, unit length: cosine = correlation), G equal groups of F/G units, every
              assignment step a greedy balanced assignment (the most similar (unit, cluster) pairs first, a cluster
              closed when full).
Importance and clustering give every copy the same partition (the copies of a layer are the same dense MLP).
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

from nemo_upcycle.core.options import CALIBRATED_SPLITS, SPLITS, UpcycleOptions

KMEANS_ITERS = 25


def _generator(seed: int, *parts) -> torch.Generator:
    digest = hashlib.sha256("/".join(map(str, (seed, "split", *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def canonical(perm: torch.Tensor, groups: int) -> torch.Tensor:
    """The permutation with each of its ``groups`` slices sorted (the order inside an expert does not matter)."""
    return torch.cat([s.sort().values for s in perm.long().chunk(groups)])


def random_permutation(F: int, G: int, seed: int, layer: int, copy: int) -> torch.Tensor:
    """The ``random`` split of one copy: seeded by (seed, layer, copy) only, so any rank draws the same."""
    return canonical(torch.randperm(F, generator=_generator(seed, layer, copy)), G)


def importance_permutation(importance: torch.Tensor, G: int) -> torch.Tensor:
    """Units ranked by importance (ties by index), dealt to the G experts in snake order (module docstring)."""
    F = importance.numel()
    if F % G:
        raise ValueError(f"{G} experts do not divide {F} units")
    order = torch.sort(importance.double(), descending=True, stable=True).indices
    pos = torch.arange(F)
    rnd, slot = pos // G, pos % G
    group = torch.where(rnd % 2 == 0, slot, G - 1 - slot)
    return torch.cat([order[group == g].sort().values for g in range(G)])


def _balanced_assign(sim: torch.Tensor, cap: int) -> torch.Tensor:
    """Each row (unit) to one column (cluster), at most ``cap`` per column, the most similar pairs first."""
    F, G = sim.shape
    flat = torch.argsort(sim.reshape(-1), descending=True, stable=True)
    assign = torch.full((F,), -1, dtype=torch.long)
    room = [cap] * G
    left = F
    for idx in flat.tolist():
        u, g = divmod(idx, G)
        if assign[u] < 0 and room[g] > 0:
            assign[u] = g
            room[g] -= 1
            left -= 1
            if left == 0:
                break
    return assign


def cluster_permutation(features: torch.Tensor, G: int, seed: int, layer: int,
                        iters: int = KMEANS_ITERS) -> torch.Tensor:
    """``features`` [F, T]: each unit's activation on T calibration tokens. Balanced spherical k-means into G groups
    of F/G units; groups ordered by their smallest unit (a deterministic labelling)."""
    F = features.shape[0]
    if F % G:
        raise ValueError(f"{G} experts do not divide {F} units")
    x = features.double()
    x = x - x.mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = _generator(seed, layer, "clustering")
    centers = x[torch.randperm(F, generator=g)[:G]].clone()  # k-means++ would also do; balance is what matters
    assign = torch.full((F,), -1, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(x @ centers.T, F // G)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(G):
            m = x[assign == c].sum(0)
            centers[c] = m / m.norm().clamp_min(1e-12)
    groups = [torch.nonzero(assign == c).flatten() for c in range(G)]
    groups.sort(key=lambda u: int(u[0]))
    return torch.cat(groups)


def group_coactivation(features: torch.Tensor, perm: torch.Tensor, G: int) -> float:
    """Mean correlation of the activation patterns of two units in the same expert minus that of two units in
    different experts (> 0: the split grouped units that fire together). ``features`` [F, T]; computed from the
    groups' summed unit vectors (O(F T), no F x F matrix)."""
    x = features.double()
    x = x - x.mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    F = x.shape[0]
    sums = [x[u].sum(0) for u in perm.chunk(G)]
    sizes = [u.numel() for u in perm.chunk(G)]
    within_pairs = sum(n * (n - 1) for n in sizes)
    within = sum(float(s @ s) - float(x[u].pow(2).sum()) for s, u in zip(sums, perm.chunk(G)))
    total = x.sum(0)
    across = float(total @ total) - sum(float(s @ s) for s in sums)
    across_pairs = F * F - sum(n * n for n in sizes)
    return within / max(within_pairs, 1) - across / max(across_pairs, 1)


def importance_balance(importance: torch.Tensor, perm: torch.Tensor, G: int) -> float:
    """max / min of the experts' summed importance (1.0: perfectly balanced)."""
    sums = torch.stack([importance.double()[u].sum() for u in perm.chunk(G)])
    return float(sums.max() / sums.min().clamp_min(1e-30))


def check_split(kind: str) -> None:
    if kind not in SPLITS:
        raise ValueError(f"unknown split {kind!r}; one of {', '.join(SPLITS)}")


def expert_units(perm: Optional[torch.Tensor], F: int, G: int, j: int) -> Optional[torch.Tensor]:
    """The units of shard j given a copy's permutation (None: the contiguous slice, a view of the dense tensors)."""
    if perm is None:
        return None
    Fe = F // G
    return perm[j * Fe:(j + 1) * Fe]


def data_free_perm(opts: UpcycleOptions, layer: int, copy: int, F: int) -> Optional[torch.Tensor]:
    """A copy's permutation when no calibration plan is given: None (contiguous) or the seeded random split; the
    calibrated splits refuse (they need ``data.calibration``)."""
    if opts.expert_split == "random":
        return random_permutation(F, opts.granularity, opts.seed, layer, copy)
    if opts.expert_split in CALIBRATED_SPLITS:
        raise RuntimeError(f"the {opts.expert_split} split of layer {layer} needs the calibration plan "
                           "(data.calibration.calibrate); none was given")
    return None


def units_of(opts: UpcycleOptions, layer: int, expert: int, F: int, perms: Optional[dict] = None):
    """The dense units expert ``expert`` of ``layer`` holds (None: its contiguous slice); ``perms``: a plan's
    layer -> [R, F] permutations."""
    G = opts.granularity
    if G == 1:
        return None
    copy = expert // G
    perm = perms[layer][copy] if perms and layer in perms else data_free_perm(opts, layer, copy, F)
    return expert_units(perm, F, G, expert % G)
