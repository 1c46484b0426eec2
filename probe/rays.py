"""RayS (Chen & Gu, KDD 2020): a label-only L∞ attack by ray search over sign directions.

The attacker sees only the predicted label. For a direction ``d`` in {-1, +1}^D, the distance to the
decision boundary along the ray ``x + r d`` (clipped to [0, 1]) is found by binary search; RayS flips
the signs of ever smaller blocks of ``d`` (the whole input, halves, quarters, …), keeping a flip when
the new ray crosses the boundary before the best radius so far, which is tested with one query at
that radius. Against a randomized target each label is a majority over ``votes`` queries; every query
counts against the per-image budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

LabelFn = Callable[[torch.Tensor], torch.Tensor]  # inputs -> predicted labels


@torch.no_grad()
def rays_attack(
    predict_label: LabelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    queries: int,
    votes: int = 1,
    tol: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x_adv within ``eps`` of ``x``, queries used per image, boundary radius found per image; inf: none found)."""
    n, shape = len(x), x.shape[1:]
    flat = x.flatten(1).float()
    dim = flat.shape[1]
    used = torch.zeros(n, dtype=torch.long)

    def wrong(idx: torch.Tensor, d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Misclassified in a majority of ``votes`` queries at ``x + r d``."""
        z = (flat[idx] + r[:, None] * d).clamp(0.0, 1.0).view(-1, *shape)
        count = sum(
            ((predict_label(z).cpu() != y[idx]).long() for _ in range(votes)), torch.zeros(len(idx), dtype=torch.long)
        )
        used[idx] += votes
        return count * 2 > votes

    def search(idx: torch.Tensor, d: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Binary search of the boundary on rays known to be adversarial at ``hi``; stops inside ε or within ``tol``."""
        lo, hi = torch.zeros_like(hi), hi.clone()
        while True:
            go = ((hi - lo) > tol) & (hi > eps) & (used[idx] + votes <= queries)
            k = go.nonzero().flatten()
            if not len(k):
                return hi
            mid = (lo[k] + hi[k]) / 2
            a = wrong(idx[k], d[k], mid)
            hi[k[a]], lo[k[~a]] = mid[a], mid[~a]

    d = torch.ones(n, dim)
    best = torch.full((n,), math.inf)
    everyone = torch.arange(n)
    start = wrong(everyone, d, torch.ones(n))  # the farthest point of the initial ray: pixels at 0 or 1
    best[start] = search(everyone[start], d[start], torch.ones(int(start.sum())))
    stage, block = 0, 0
    while True:
        active = ((best > eps) & (used + votes <= queries)).nonzero().flatten()
        if not len(active):
            break
        size = math.ceil(dim / 2**stage)
        lo_i, hi_i = block * size, min(dim, (block + 1) * size)
        candidate = d[active].clone()
        candidate[:, lo_i:hi_i] *= -1
        radius = best[active].clamp(max=1.0)
        better = wrong(active, candidate, radius)
        if better.any():
            idx = active[better]
            d[idx] = candidate[better]
            best[idx] = search(idx, candidate[better], radius[better])
        block += 1
        if (
            block * size >= dim
        ):  # every block of this size tried: halve the blocks (back to the whole input below one pixel)
            stage, block = (stage + 1 if size > 1 else 0), 0
    r = best.clamp(max=eps)
    x_adv = (flat + r[:, None] * d).clamp(0.0, 1.0).view(n, *shape).to(x.dtype)
    return x_adv, used, best


@torch.no_grad()
def confirmed_rays(
    predict_label: LabelFn, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int, votes: int = 1, confirm: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RayS within ``queries - confirm`` queries per image, then a final confirmation: an image whose boundary lies
    within ``eps`` counts as broken only if ``confirm`` fresh queries of its adversarial input all miss the label
    (stopped at the first that does not). Returns (x_adv, queries used per image, broken per image)."""
    if queries <= confirm + votes:
        raise ValueError(f"a budget of {queries} queries leaves nothing to search with after {confirm} confirmations")
    x_adv, used, best = rays_attack(predict_label, x, y, eps, queries - confirm, votes=votes)
    pending = (best <= eps).nonzero().flatten()
    for _ in range(confirm):
        if not len(pending):
            break
        wrong = predict_label(x_adv[pending]).cpu() != y[pending]
        used[pending] += 1
        pending = pending[wrong]
    broken = torch.zeros(len(x), dtype=torch.bool)
    broken[pending] = True
    return x_adv, used, broken
