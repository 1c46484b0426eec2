"""Randomized coded inference (RCI): permute → encode → block on N coded samples → decode → un-permute.

The permutation decides which spline neighbour each item gets, so an attacker
who does not know it cannot aim at the exact function the server evaluates.
All coding groups of a device batch go through the block in a single call.
"""

from __future__ import annotations

import torch
from torch import nn

from .spline import SplineCode


def random_permutations(groups: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """(groups, k) independent random permutations, drawn on the CPU for determinism."""
    keys = torch.rand(groups, k, generator=generator)
    return keys.argsort(dim=1)


def identity_permutations(groups: int, k: int) -> torch.Tensor:
    return torch.arange(k).expand(groups, k).clone()


def rci_forward_groups(
    block: nn.Module,
    z: torch.Tensor,
    code: SplineCode,
    perms: torch.Tensor,
) -> torch.Tensor:
    """RCI on G coding groups at once: ``z`` is (G, K, *shape), ``perms`` is (G, K).

    Returns the decoded block outputs (G, K, *out_shape) in the input order.
    """
    groups, k = z.shape[0], z.shape[1]
    if perms.shape != (groups, k):
        raise ValueError(f"perms must be {(groups, k)}, got {tuple(perms.shape)}")
    perms = perms.to(z.device)
    index = perms.view(groups, k, *([1] * (z.dim() - 2))).expand_as(z)
    permuted = torch.gather(z, 1, index)
    coded = code.encode(permuted, group_dims=1)  # (G, N, *shape)
    flat = coded.reshape(groups * code.n, *coded.shape[2:])
    out = block(flat)
    out = out.reshape(groups, code.n, *out.shape[1:])
    decoded = code.decode(out, group_dims=1)  # (G, K, *out_shape), permuted order
    restored = torch.empty_like(decoded)
    out_index = perms.view(groups, k, *([1] * (decoded.dim() - 2))).expand_as(decoded)
    restored.scatter_(1, out_index, decoded)
    return restored


def rci_forward(
    block: nn.Module,
    x: torch.Tensor,
    code: SplineCode,
    generator: torch.Generator | None = None,
    permute: bool = True,
) -> torch.Tensor:
    """RCI on one batch ``x`` of K items (the paper's batch semantics).

    Deterministic given ``generator``; ``permute=False`` uses the identity
    permutation (a sanity-check mode for attacks).
    """
    k = x.shape[0]
    if k != code.k:
        raise ValueError(f"batch has {k} items but the code expects K={code.k}")
    perms = random_permutations(1, k, generator) if permute else identity_permutations(1, k)
    return rci_forward_groups(block, x.unsqueeze(0), code, perms)[0]


def rci_forward_with_companions(
    block: nn.Module,
    z: torch.Tensor,
    companions: torch.Tensor,
    code: SplineCode,
    generator: torch.Generator | None = None,
    permute: bool = True,
) -> torch.Tensor:
    """RCI outputs for M items, each coded in its own group with K-1 companions.

    ``z`` is (M, *shape) (the items' trunk outputs), ``companions`` is (M, K-1, *shape):
    trusted filler (request scope) or other clients' items (batch scope). Item m sits
    at slot 0 of group m before the permutation. Differentiable in both arguments,
    which is what an adaptive attacker (or a co-tenant) differentiates through.
    """
    m, k = z.shape[0], code.k
    if companions.shape[:2] != (m, k - 1):
        raise ValueError(f"companions must be ({m}, {k - 1}, ...), got {tuple(companions.shape)}")
    groups = torch.cat([z.unsqueeze(1), companions], dim=1)
    perms = random_permutations(m, k, generator) if permute else identity_permutations(m, k)
    return rci_forward_groups(block, groups, code, perms)[:, 0]
