"""Randomized coded inference (RCI): one planner, one apply.

``plan_groups`` decides who is coded with whom and in which slot: from the
request sizes, the scope, K, the size of the trusted filler pool and a random
source, it returns index rows into ``[items | filler]`` and one permutation per
group. ``apply_plan`` runs those groups through the block (encode → block on the
coded samples → decode) and scatters the decoded outputs back to the items.
The server's engine, the attacker's differentiable model and the co-tenant
probe all call these two, so what is attacked is what is served.

Scopes:
- ``request``: each request's items are chunked into groups of K and padded
  with filler drawn without replacement; no client's items meet another's.
- ``batch`` (the paper): the whole micro-batch is shuffled and chunked into
  groups of K; the last group is padded with filler.

Sparse decode (request scope): a group whose r real items sit in slots S needs
only the coded samples j where the decoder rows D[S, j] carry weight. The block
runs on the top-M(r) coded samples by max_s |D[s, j]|, where M(r) = min(N, r·M1)
and M1 is the most decoder weights above the tolerance in any one row. M
depends on r alone, never on the slots drawn, so the work (and the time) does
not reveal the permutation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from .randomness import RandomSource, choices, permutations
from .spec import check_scope
from .spline import SplineCode


@dataclass(frozen=True)
class CodingPlan:
    """Coding groups for ``n_items`` real items; filler index f appears as ``n_items + f``.

    ``rows[g]`` lists group g's members before the permutation, ``perms[g]`` the
    permutation; the member in slot s is ``rows[g, perms[g, s]]`` (``slots``). The index
    views are derived once per plan (apply reads them several times).
    """

    rows: torch.Tensor  # (G, K) int64
    perms: torch.Tensor  # (G, K) int64
    n_items: int

    @property
    def groups(self) -> int:
        return int(self.rows.shape[0])

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])

    @cached_property
    def slots(self) -> torch.Tensor:
        return self.rows.gather(1, self.perms)

    @cached_property
    def real(self) -> torch.Tensor:
        """(G, K) bool: slot holds a real item."""
        return self.slots < self.n_items

    @cached_property
    def item_positions(self) -> torch.Tensor:
        """(n_items,) flat slot index g·K + s of each item."""
        flat = self.slots.flatten()
        where = torch.empty(self.n_items, dtype=torch.int64)
        real = flat < self.n_items
        where[flat[real]] = real.nonzero().flatten()
        return where

    @property
    def filler_share(self) -> float:
        return 1.0 - self.n_items / max(1, self.rows.numel())

    @staticmethod
    def concat(plans: Sequence[CodingPlan]) -> CodingPlan:
        """One plan over the items of several plans, in order (their groups stay apart)."""
        total = sum(p.n_items for p in plans)
        rows, offset = [], 0
        for p in plans:
            is_item = p.rows < p.n_items
            rows.append(torch.where(is_item, p.rows + offset, p.rows - p.n_items + total))
            offset += p.n_items
        return CodingPlan(torch.cat(rows), torch.cat([p.perms for p in plans]), total)


def plan_groups(sizes: Sequence[int], scope: str, k: int, filler_pool: int, source: RandomSource) -> CodingPlan:
    """Coding groups for requests of ``sizes`` items (see the module docstring for the scopes)."""
    sizes = [int(s) for s in sizes]
    if k < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"need K >= 2 and requests of at least one item, got K={k}, sizes={sizes}")
    check_scope(scope)
    total = sum(sizes)
    if scope == "request":
        members, units, start = [], [], 0
        for size in sizes:
            unit = source.unit()
            for g in range(0, size, k):
                members.append(torch.arange(start + g, min(start + g + k, start + size)))
                units.append(unit)
            start += size
    else:  # batch
        unit = source.unit()
        members = list(torch.split(permutations(unit, 1, total)[0], k))
        units = [unit] * len(members)
    if filler_pool < 1 and any(len(m) < k for m in members):
        raise ValueError("padding a coding group needs a filler pool of at least one item")
    # Draws go group by group (filler, then permutation), so with a seeded source a
    # group's coding does not depend on how many groups come after it.
    rows, perms = [], []
    for m, unit in zip(members, units):
        need = k - len(m)
        rows.append(torch.cat([m, choices(unit, 1, filler_pool, need)[0] + total]) if need else m)
        perms.append(permutations(unit, 1, k)[0])
    return CodingPlan(torch.stack(rows), torch.stack(perms), total)


def sparse_width(code: SplineCode, tolerance: float) -> int:
    """M1: the most decoder weights above ``tolerance`` in any one row of D (N when tolerance is 0)."""
    if tolerance <= 0:
        return code.n
    return max(1, int((code.D.abs() > tolerance).sum(1).max()))


def apply_plan(
    block: nn.Module,
    items: torch.Tensor,
    filler: torch.Tensor,
    plan: CodingPlan,
    code: SplineCode,
    tolerance: float = 0.0,
) -> torch.Tensor:
    """Decoded block outputs (n_items, *out) for ``items`` (n_items, *shape) coded as ``plan`` says.

    ``filler`` (m, *shape) are the companions the plan draws from. Differentiable
    in ``items`` and ``filler``. ``tolerance`` > 0 runs the sparse decode; every
    group of one plan goes through the block in a single call.
    """
    if plan.n_items != items.shape[0] or plan.k != code.k:
        raise ValueError(f"plan is for {plan.n_items} items and K={plan.k}; got {items.shape[0]} items and K={code.k}")
    pool = torch.cat([items, filler.to(items.dtype)]) if filler.shape[0] else items
    slots = plan.slots.to(items.device)
    grouped = pool[slots]  # (G, K, *shape)
    g, k = slots.shape
    flat = grouped.reshape(g, k, -1)
    enc, dec = code.E.to(items.device, items.dtype), code.D.to(items.device, items.dtype)
    width = sparse_width(code, tolerance)
    real = plan.real.to(items.device)
    counts = real.sum(1)
    # One bucket of groups per sparse width M(r); the full decode is a single bucket of width N.
    buckets: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    if width >= code.n:
        buckets.append((torch.arange(g, device=items.device), None))
    else:
        for r in torch.unique(counts).tolist():
            members = (counts == r).nonzero().flatten()
            m = min(code.n, int(r) * width)
            if m >= code.n:
                buckets.append((members, None))
                continue
            score = (real[members].unsqueeze(2) * dec.abs().unsqueeze(0)).amax(1)  # (Gb, N)
            buckets.append((members, score.topk(m, dim=1).indices))
    coded = []
    for members, sel in buckets:
        e = enc.expand(len(members), -1, -1) if sel is None else enc[sel]  # (Gb, M, K)
        coded.append(torch.bmm(e, flat[members]))
    sizes = [c.shape[0] * c.shape[1] for c in coded]
    out: torch.Tensor = block(torch.cat([c.reshape(-1, *items.shape[1:]) for c in coded]))
    decoded = out.new_empty((g, k, *out.shape[1:]))
    for (members, sel), part, size in zip(buckets, torch.split(out, sizes), coded):
        d = dec.expand(len(members), -1, -1) if sel is None else dec.t()[sel].transpose(1, 2)  # (Gb, K, M)
        res = torch.bmm(d, part.reshape(len(members), size.shape[1], -1))
        decoded = decoded.index_copy(0, members, res.reshape(len(members), k, *out.shape[1:]))
    return decoded.reshape(g * k, *out.shape[1:])[plan.item_positions.to(items.device)]


AFFINE_LAYERS = (nn.Flatten, nn.Linear, nn.Identity)


def hoist_affine_prefix(trunk: nn.Module, block: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """Move the block's leading per-item affine layers (Flatten, Linear) to the end of the trunk.

    Every row of a spline encoder sums to 1 (a spline through constant data is that
    constant), so an affine map commutes with encoding: A(Σ_k e_k z_k) + b = Σ_k e_k (A z_k + b).
    Coding the output of that prefix instead of its input is the same function (up to float
    rounding), and the encode and the coded block then work on the prefix's output, for
    ``small_cnn``'s head 64 numbers per item instead of 6,272. Blocks that do not start with
    such layers are returned as they are.
    """
    leaves: list[nn.Module] = []

    def flatten(module: nn.Module) -> None:
        if isinstance(module, nn.Sequential):
            for child in module:
                flatten(child)
        else:
            leaves.append(module)

    flatten(block)
    cut = 0
    while cut < len(leaves) - 1 and isinstance(leaves[cut], AFFINE_LAYERS):
        cut += 1
    if cut == 0:
        return nn.Sequential(trunk), nn.Sequential(block)
    return nn.Sequential(trunk, *leaves[:cut]), nn.Sequential(*leaves[cut:])


def identity_permutations(groups: int, k: int) -> torch.Tensor:
    """(groups, k) identity permutations: every draw fixed (the attack client's sanity-check model)."""
    return torch.arange(k).expand(groups, k).clone()
