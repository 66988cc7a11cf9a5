"""Router rows from the dense model's hidden states, so that experts specialise from step 1.

X [T, D] are the hidden states entering one MoE layer's router (after the layer's pre-MLP RMSNorm, what the router
multiplies) on calibration text.

  kmeans   spherical k-means of X into R = E / G clusters (seeded k-means++ start, Lloyd iterations on unit vectors);
           the centroids, each repeated G times (the G experts of a copy share a row: a virtual-group router, so
           step 0 stays exact). LLaMA-MoE v2's k-means gates (arXiv 2411.15708).
  hidden   one prompt file per copy (per expert at G = 1): the mean of its unit hidden states, repeated G times.
           mergekit-moe's ``gate_mode: hidden`` (mergekit/moe/router.py) with its convention of one prompt set per
           expert.
  kmeans with a clustering split: expert (i, j) gets centroid i plus the direction of the tokens that activate its
           units more than the copy's other experts do (the covariance of X with the expert's share of the
           activation mass): a row per expert, not a virtual group, so step 0 is no longer exact.
Rows are scaled so the logits on X spread as much as those of the ``normal`` router they replace (std
``router_std`` x rms |x|); their directions are the data's.
"""

from __future__ import annotations

import hashlib

import torch

KMEANS_ITERS = 50


def _generator(seed: int, layer: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/router_init/{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def spherical_kmeans(X: torch.Tensor, k: int, seed: int, layer: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """k unit centroids [k, D] of the rows of X (needs at least k rows); a cluster left empty takes the point
    farthest from its centroid."""
    x = unit_rows(X)
    T = x.shape[0]
    if T < k:
        raise ValueError(f"k-means of {T} points into {k} clusters")
    g = _generator(seed, layer)
    first = int(torch.randint(T, (1,), generator=g))
    centers = [x[first]]
    best = 1 - x @ x[first]
    for _ in range(1, k):  # k-means++: the next centre drawn with probability ~ distance^2
        w = best.clamp_min(0) ** 2
        i = int(torch.multinomial(w / w.sum(), 1, generator=g)) if w.sum() > 0 else int(torch.randint(T, (1,),
                                                                                                       generator=g))
        centers.append(x[i])
        best = torch.minimum(best, 1 - x @ x[i])
    C = torch.stack(centers)
    assign = None
    for _ in range(iters):
        sim = x @ C.T
        new = sim.argmax(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = x[assign == c]
            if members.shape[0]:
                C[c] = unit_rows(members.sum(0))
            else:
                C[c] = x[int(sim.max(1).values.argmin())]
    return C


def scaled(rows: torch.Tensor, X: torch.Tensor, router_std: float) -> torch.Tensor:
    """``rows`` scaled so that the logits X @ rows^T have the std of a normal(0, router_std) router's on X."""
    logits = X.double() @ rows.double().T
    spread = logits.std()
    target = router_std * X.double().norm(dim=-1).pow(2).mean().sqrt()
    if not (spread > 0 and target > 0):
        return rows.double()
    return rows.double() * (target / spread)


def grouped(rows: torch.Tensor, G: int) -> torch.Tensor:
    """R rows -> E = R * G rows, each repeated for the G experts of its copy (a virtual-group router)."""
    return rows.repeat_interleave(G, dim=0)


def kmeans_router(X: torch.Tensor, E: int, G: int, router_std: float, seed: int, layer: int) -> torch.Tensor:
    """[E, D]: R = E / G k-means centroids, each repeated G times, scaled (module docstring)."""
    return grouped(scaled(spherical_kmeans(X, E // G, seed, layer), X, router_std), G).float()


def hidden_router(prompt_means: torch.Tensor, X: torch.Tensor, G: int, router_std: float) -> torch.Tensor:
    """[E, D] from the R prompt means [R, D] (one per copy), each repeated G times, scaled on X."""
    return grouped(scaled(unit_rows(prompt_means), X, router_std), G).float()


def clustered_router(X: torch.Tensor, share: torch.Tensor, E: int, G: int, router_std: float, seed: int,
                     layer: int) -> torch.Tensor:
    """[E, D] for a clustering split: ``share`` [T, G] is each token's fraction of a copy's activation mass that falls
    in each of its G experts' units; expert (i, j) = centroid i + the unit direction of cov(X, share_j)."""
    R = E // G
    C = spherical_kmeans(X, R, seed, layer) if R > 1 else unit_rows(X.double().mean(0, keepdim=True))
    xc = X.double() - X.double().mean(0)
    s = share.double() - share.double().mean(0)
    D = unit_rows((s.T @ xc))  # [G, D]
    rows = unit_rows(C[:, None, :] + D[None, :, :]).reshape(E, -1)
    return scaled(rows, X, router_std).float()


def expert_load(X: torch.Tensor, router: torch.Tensor, topk: int) -> torch.Tensor:
    """Fraction of the T x k (token, slot) choices each expert gets under ``router`` on X (top-k of the logits: the
    choice Megatron's routers make, whatever the score function)."""
    idx = torch.topk(X.float() @ router.float().T, topk, dim=-1).indices
    return torch.bincount(idx.reshape(-1), minlength=router.shape[0]).double() / idx.numel()


def load_imbalance(load: torch.Tensor) -> float:
    """max load / mean load (1.0: perfectly even; E: every token to one expert): Megatron's ``max/mean`` view."""
    return float(load.max() / load.mean())
